// Command tlogverify checks mailhook's audit evidence with code that mailhook did not
// write: golang.org/x/mod's sumdb/note opens the signed checkpoint and sumdb/tlog checks
// the RFC 6962 inclusion and consistency proofs against it. An independent verifier is
// the point: a bug in mailhook's own Merkle or signature code cannot hide behind a
// verifier that shares it.
//
// Usage:
//
//	tlogverify -vkey VKEY FILE
//
// VKEY is a signed-note verifier key (name+hexid+base64, as note.NewVerifier takes).
// FILE (or - for standard input) is a JSON document:
//
//	{
//	  "checkpoint": "<C2SP signed note: origin, size, base64 root, blank line, signatures>",
//	  "inclusion": [{"index": 5, "record": "<base64 record bytes>", "proof": ["<base64 hash>", ...]}],
//	  "consistency": [{"old": "<an older signed checkpoint>", "proof": ["<base64 hash>", ...]}]
//	}
//
// Both arrays are optional. Each check that passes prints one line on stdout; the first
// that fails prints "FAILED: <what> : <error>" on stderr and exits 1. Usage errors exit 2.
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

// evidence is the JSON document. Pointers tell an absent field from a zero one, so that
// a missing index or record is an error rather than a silent index 0 or empty record.
type evidence struct {
	Checkpoint  *string           `json:"checkpoint"`
	Inclusion   []inclusionItem   `json:"inclusion"`
	Consistency []consistencyItem `json:"consistency"`
}

type inclusionItem struct {
	Index  *int64   `json:"index"`
	Record *string  `json:"record"`
	Proof  []string `json:"proof"`
}

type consistencyItem struct {
	Old   *string  `json:"old"`
	Proof []string `json:"proof"`
}

// checkpoint is the parsed text of a C2SP tlog-checkpoint.
type checkpoint struct {
	Origin string
	Size   int64
	Root   tlog.Hash
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// run is main without the process around it, so that tests can call it directly.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("tlogverify", flag.ContinueOnError)
	fs.SetOutput(stderr)
	vkey := fs.String("vkey", "", "verifier key of the log (name+hexid+base64)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: tlogverify -vkey VKEY FILE   (FILE may be - for standard input)")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *vkey == "" || fs.NArg() != 1 {
		fs.Usage()
		return 2
	}
	verifier, err := note.NewVerifier(*vkey)
	if err != nil {
		// A key that does not parse is a mistake in the command line, not a failed check.
		fmt.Fprintf(stderr, "tlogverify: invalid -vkey: %v\n", err)
		return 2
	}
	// Only this one key is trusted: a checkpoint must carry a valid signature by it.
	// Signatures by other keys (witnesses, a rotated key) are ignored, as the signed-note
	// format requires of unknown signatures.
	verifiers := note.VerifierList(verifier)

	fail := func(what string, err error) int {
		fmt.Fprintf(stderr, "FAILED: %s : %v\n", what, err)
		return 1
	}

	file := fs.Arg(0)
	var data []byte
	if file == "-" {
		data, err = io.ReadAll(stdin)
	} else {
		data, err = os.ReadFile(file)
	}
	if err != nil {
		return fail("read "+file, err)
	}
	ev, err := parseEvidence(data)
	if err != nil {
		return fail("parse evidence", err)
	}

	head, err := openCheckpoint(*ev.Checkpoint, verifiers)
	if err != nil {
		return fail("checkpoint", err)
	}
	fmt.Fprintf(stdout, "checkpoint ok: origin=%s size=%d\n", head.Origin, head.Size)

	for i, item := range ev.Inclusion {
		what := fmt.Sprintf("inclusion[%d]", i)
		if item.Index == nil || item.Record == nil {
			return fail(what, errors.New(`"index" and "record" are required`))
		}
		what = fmt.Sprintf("inclusion[%d] index=%d", i, *item.Index)
		record, err := decodeBase64(*item.Record)
		if err != nil {
			return fail(what, fmt.Errorf("record: %v", err))
		}
		proof, err := decodeProof(item.Proof)
		if err != nil {
			return fail(what, err)
		}
		// RecordHash is the RFC 6962 leaf hash, SHA-256(0x00 || record): the proof is
		// checked against the record bytes themselves, not a hash the evidence supplies.
		if err := tlog.CheckRecord(proof, head.Size, head.Root, *item.Index, tlog.RecordHash(record)); err != nil {
			return fail(what, err)
		}
		fmt.Fprintf(stdout, "inclusion ok: index=%d\n", *item.Index)
	}

	for i, item := range ev.Consistency {
		what := fmt.Sprintf("consistency[%d]", i)
		if item.Old == nil {
			return fail(what, errors.New(`"old" is required`))
		}
		old, err := openCheckpoint(*item.Old, verifiers)
		if err != nil {
			return fail(what+" old checkpoint", err)
		}
		// The same key could sign for several logs; a proof between two of them means
		// nothing, so both checkpoints must name the same log.
		if old.Origin != head.Origin {
			return fail(what, fmt.Errorf("old checkpoint's origin %q is not %q", old.Origin, head.Origin))
		}
		what = fmt.Sprintf("consistency[%d] %d -> %d", i, old.Size, head.Size)
		proof, err := decodeProof(item.Proof)
		if err != nil {
			return fail(what, err)
		}
		// CheckTree recomputes both roots from the proof and the old root: the newer
		// tree must extend the older one, not merely be signed by the same key.
		if err := tlog.CheckTree(proof, head.Size, head.Root, old.Size, old.Root); err != nil {
			return fail(what, err)
		}
		fmt.Fprintf(stdout, "consistency ok: %d -> %d\n", old.Size, head.Size)
	}
	return 0
}

// parseEvidence decodes the JSON document strictly: an unknown field (a misspelt
// "inclusion", say) would otherwise drop checks without a word.
func parseEvidence(data []byte) (*evidence, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var ev evidence
	if err := dec.Decode(&ev); err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("unexpected data after the JSON document")
	}
	if ev.Checkpoint == nil {
		return nil, errors.New(`"checkpoint" is required`)
	}
	return &ev, nil
}

// openCheckpoint verifies the signed note against the trusted key and parses its text.
func openCheckpoint(msg string, verifiers note.Verifiers) (checkpoint, error) {
	n, err := note.Open([]byte(msg), verifiers)
	if err != nil {
		return checkpoint{}, err
	}
	return parseCheckpoint(n.Text)
}

// parseCheckpoint parses a C2SP tlog-checkpoint note text: origin, tree size and root
// hash lines, then optional extension lines, each line non-empty and newline-terminated.
// It is strict so that one signed text has exactly one reading: no leading zeros or
// signs in the size, and only the canonical base64 of a 32-byte root.
// x/mod's tlog.ParseTree reads the older Go checksum database format with a fixed
// first line, so it does not fit here.
func parseCheckpoint(text string) (checkpoint, error) {
	if !strings.HasSuffix(text, "\n") {
		return checkpoint{}, errors.New("checkpoint text does not end in a newline")
	}
	lines := strings.Split(strings.TrimSuffix(text, "\n"), "\n")
	if len(lines) < 3 {
		return checkpoint{}, fmt.Errorf("checkpoint text has %d lines, want at least 3", len(lines))
	}
	for i, line := range lines {
		if line == "" {
			return checkpoint{}, fmt.Errorf("checkpoint line %d is empty", i+1)
		}
	}
	size, err := parseSize(lines[1])
	if err != nil {
		return checkpoint{}, err
	}
	root, err := decodeHash(lines[2])
	if err != nil {
		return checkpoint{}, fmt.Errorf("checkpoint root hash: %v", err)
	}
	return checkpoint{Origin: lines[0], Size: size, Root: root}, nil
}

// parseSize reads the tree size line: ASCII digits only, no leading zero unless it is
// "0", and within int64 (the type tlog works in).
func parseSize(s string) (int64, error) {
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("checkpoint tree size %q is not a decimal number", s)
		}
	}
	if len(s) > 1 && s[0] == '0' {
		return 0, fmt.Errorf("checkpoint tree size %q has a leading zero", s)
	}
	size, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("checkpoint tree size %q: %v", s, err)
	}
	return size, nil
}

// decodeBase64 decodes standard base64 and accepts only its canonical form, the one
// encoding of the bytes: Go's decoder skips embedded newlines and ignores non-zero
// padding bits, so several strings could otherwise name the same bytes.
func decodeBase64(s string) ([]byte, error) {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, err
	}
	if base64.StdEncoding.EncodeToString(b) != s {
		return nil, errors.New("not canonical standard base64")
	}
	return b, nil
}

// decodeHash decodes one base64 SHA-256 hash; any other length is an error, never
// truncated or padded.
func decodeHash(s string) (tlog.Hash, error) {
	var h tlog.Hash
	b, err := decodeBase64(s)
	if err != nil {
		return h, err
	}
	if len(b) != tlog.HashSize {
		return h, fmt.Errorf("hash is %d bytes, want %d", len(b), tlog.HashSize)
	}
	copy(h[:], b)
	return h, nil
}

// decodeProof decodes a proof's hashes, in order. An absent proof is an empty one (a
// one-record tree, or two checkpoints of the same size, need no hashes).
func decodeProof(hashes []string) ([]tlog.Hash, error) {
	proof := make([]tlog.Hash, 0, len(hashes))
	for i, s := range hashes {
		h, err := decodeHash(s)
		if err != nil {
			return nil, fmt.Errorf("proof[%d]: %v", i, err)
		}
		proof = append(proof, h)
	}
	return proof, nil
}
