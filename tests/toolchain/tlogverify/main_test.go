package main

// The tests make their own evidence with x/mod's writer side (note.GenerateKey and
// note.Sign, tlog.StoredHashes, tlog.ProveRecord and tlog.ProveTree), then check that
// tlogverify accepts it whole and rejects each kind of tampering on its own.

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

const origin = "example.test/mailhook-audit"

// TestMain lets a test run the real main (and so its os.Exit codes) in a child process:
// the test binary re-executes itself with TLOGVERIFY_RUN_MAIN set.
func TestMain(m *testing.M) {
	if os.Getenv("TLOGVERIFY_RUN_MAIN") == "1" {
		os.Args = append([]string{"tlogverify"}, os.Args[1:]...)
		main()
		return
	}
	os.Exit(m.Run())
}

// memLog is a tiny transparency log: records and the stored hashes of their tree, kept
// in memory in tlog's storage order.
type memLog struct {
	records [][]byte
	hashes  []tlog.Hash
}

func (l *memLog) reader() tlog.HashReader {
	return tlog.HashReaderFunc(func(indexes []int64) ([]tlog.Hash, error) {
		out := make([]tlog.Hash, len(indexes))
		for i, x := range indexes {
			if x < 0 || x >= int64(len(l.hashes)) {
				return nil, fmt.Errorf("no stored hash %d", x)
			}
			out[i] = l.hashes[x]
		}
		return out, nil
	})
}

func (l *memLog) add(t *testing.T, record []byte) {
	t.Helper()
	hs, err := tlog.StoredHashes(int64(len(l.records)), record, l.reader())
	if err != nil {
		t.Fatal(err)
	}
	l.hashes = append(l.hashes, hs...)
	l.records = append(l.records, record)
}

func (l *memLog) root(t *testing.T, size int64) tlog.Hash {
	t.Helper()
	h, err := tlog.TreeHash(size, l.reader())
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// newLog makes a log of n records; records before fork are shared by every log, those
// from fork on carry the tag, so two tags give two histories that part at fork.
func newLog(t *testing.T, n, fork int, tag string) *memLog {
	l := &memLog{}
	for i := 0; i < n; i++ {
		rec := fmt.Sprintf("audit record %d\n", i)
		if i >= fork {
			rec = fmt.Sprintf("audit record %d (%s)\n", i, tag)
		}
		l.add(t, []byte(rec))
	}
	return l
}

type key struct{ skey, vkey string }

func newKey(t *testing.T, name string) key {
	t.Helper()
	skey, vkey, err := note.GenerateKey(rand.Reader, name)
	if err != nil {
		t.Fatal(err)
	}
	return key{skey, vkey}
}

// signText signs a note text with the given keys.
func signText(t *testing.T, text string, keys ...key) string {
	t.Helper()
	var signers []note.Signer
	for _, k := range keys {
		s, err := note.NewSigner(k.skey)
		if err != nil {
			t.Fatal(err)
		}
		signers = append(signers, s)
	}
	msg, err := note.Sign(&note.Note{Text: text}, signers...)
	if err != nil {
		t.Fatal(err)
	}
	return string(msg)
}

func checkpointText(org string, size int64, root tlog.Hash) string {
	return fmt.Sprintf("%s\n%d\n%s\n", org, size, base64.StdEncoding.EncodeToString(root[:]))
}

func (l *memLog) checkpoint(t *testing.T, k key, size int64) string {
	return signText(t, checkpointText(origin, size, l.root(t, size)), k)
}

// The evidence document as a producer would write it (plain fields, unlike the
// verifier's pointers).
type jsInclusion struct {
	Index  int64    `json:"index"`
	Record string   `json:"record"`
	Proof  []string `json:"proof"`
}

type jsConsistency struct {
	Old   string   `json:"old"`
	Proof []string `json:"proof"`
}

type jsEvidence struct {
	Checkpoint  string          `json:"checkpoint"`
	Inclusion   []jsInclusion   `json:"inclusion,omitempty"`
	Consistency []jsConsistency `json:"consistency,omitempty"`
}

func b64Hashes(hs []tlog.Hash) []string {
	out := []string{}
	for _, h := range hs {
		out = append(out, base64.StdEncoding.EncodeToString(h[:]))
	}
	return out
}

func (l *memLog) inclusion(t *testing.T, size, index int64) jsInclusion {
	t.Helper()
	p, err := tlog.ProveRecord(size, index, l.reader())
	if err != nil {
		t.Fatal(err)
	}
	return jsInclusion{Index: index, Record: base64.StdEncoding.EncodeToString(l.records[index]), Proof: b64Hashes(p)}
}

func (l *memLog) consistency(t *testing.T, k key, size, oldSize int64) jsConsistency {
	t.Helper()
	p, err := tlog.ProveTree(size, oldSize, l.reader())
	if err != nil {
		t.Fatal(err)
	}
	return jsConsistency{Old: l.checkpoint(t, k, oldSize), Proof: b64Hashes(p)}
}

// fixture is a log of 13 records, its key, and evidence for size 13 with inclusion
// proofs for records 0, 5 and 12 and consistency proofs from sizes 1, 7 and 13.
type fixture struct {
	log *memLog
	key key
	ev  jsEvidence
}

func newFixture(t *testing.T) fixture {
	t.Helper()
	k := newKey(t, origin)
	l := newLog(t, 13, 13, "")
	ev := jsEvidence{Checkpoint: l.checkpoint(t, k, 13)}
	for _, i := range []int64{0, 5, 12} {
		ev.Inclusion = append(ev.Inclusion, l.inclusion(t, 13, i))
	}
	for _, n := range []int64{1, 7, 13} {
		ev.Consistency = append(ev.Consistency, l.consistency(t, k, 13, n))
	}
	return fixture{l, k, ev}
}

const fixtureOK = "checkpoint ok: origin=" + origin + " size=13\n" +
	"inclusion ok: index=0\ninclusion ok: index=5\ninclusion ok: index=12\n" +
	"consistency ok: 1 -> 13\nconsistency ok: 7 -> 13\nconsistency ok: 13 -> 13\n"

// verify writes the evidence to a file and runs the verifier on it.
func verify(t *testing.T, vkey string, ev any) (code int, stdout, stderr string) {
	t.Helper()
	data, err := json.Marshal(ev)
	if err != nil {
		t.Fatal(err)
	}
	return verifyBytes(t, vkey, data)
}

func verifyBytes(t *testing.T, vkey string, data []byte) (code int, stdout, stderr string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "evidence.json")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	var out, errOut bytes.Buffer
	code = run([]string{"-vkey", vkey, path}, strings.NewReader(""), &out, &errOut)
	return code, out.String(), errOut.String()
}

// wantFailure checks for exit 1 and a FAILED line naming what failed.
func wantFailure(t *testing.T, code int, stderr, prefix string) {
	t.Helper()
	if code != 1 {
		t.Fatalf("exit code %d, want 1; stderr: %s", code, stderr)
	}
	if !strings.HasPrefix(stderr, "FAILED: "+prefix+" : ") || strings.Count(stderr, "\n") != 1 {
		t.Fatalf("stderr %q, want one line starting %q", stderr, "FAILED: "+prefix+" : ")
	}
}

func flipBit(t *testing.T, s string) string {
	t.Helper()
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0x01
	return base64.StdEncoding.EncodeToString(b)
}

func TestAcceptsValidEvidence(t *testing.T) {
	f := newFixture(t)
	code, out, errOut := verify(t, f.key.vkey, f.ev)
	if code != 0 || out != fixtureOK || errOut != "" {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
}

func TestReadsStandardInput(t *testing.T) {
	f := newFixture(t)
	data, _ := json.Marshal(f.ev)
	var out, errOut bytes.Buffer
	code := run([]string{"-vkey", f.key.vkey, "-"}, bytes.NewReader(data), &out, &errOut)
	if code != 0 || out.String() != fixtureOK {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, out.String(), errOut.String())
	}
}

func TestCheckpointAlone(t *testing.T) {
	f := newFixture(t)
	want := "checkpoint ok: origin=" + origin + " size=13\n"
	for _, doc := range []string{
		fmt.Sprintf(`{"checkpoint": %q}`, f.ev.Checkpoint),
		fmt.Sprintf(`{"checkpoint": %q, "inclusion": [], "consistency": []}`, f.ev.Checkpoint),
		fmt.Sprintf(`{"checkpoint": %q, "inclusion": null}`, f.ev.Checkpoint),
	} {
		code, out, errOut := verifyBytes(t, f.key.vkey, []byte(doc))
		if code != 0 || out != want {
			t.Fatalf("%s: exit %d\nstdout:\n%s\nstderr:\n%s", doc, code, out, errOut)
		}
	}
}

// A checkpoint that others cosigned (witnesses) still verifies with the log's key alone.
func TestIgnoresOtherSignatures(t *testing.T) {
	f := newFixture(t)
	witness := newKey(t, "witness.example.test")
	f.ev.Checkpoint = signText(t, checkpointText(origin, 13, f.log.root(t, 13)), witness, f.key)
	if code, out, errOut := verify(t, f.key.vkey, f.ev); code != 0 || out != fixtureOK {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
}

func TestRejectsTamperedRecord(t *testing.T) {
	f := newFixture(t)
	f.ev.Inclusion[1].Record = flipBit(t, f.ev.Inclusion[1].Record)
	code, out, errOut := verify(t, f.key.vkey, f.ev)
	wantFailure(t, code, errOut, "inclusion[1] index=5")
	// The checks before the first failure were reported; none after it ran.
	if want := "checkpoint ok: origin=" + origin + " size=13\ninclusion ok: index=0\n"; out != want {
		t.Fatalf("stdout %q, want %q", out, want)
	}
}

// The right record under another index is not included there.
func TestRejectsRecordAtWrongIndex(t *testing.T) {
	f := newFixture(t)
	f.ev.Inclusion[1].Record = base64.StdEncoding.EncodeToString(f.log.records[4])
	code, _, errOut := verify(t, f.key.vkey, f.ev)
	wantFailure(t, code, errOut, "inclusion[1] index=5")
}

func TestRejectsTamperedInclusionProof(t *testing.T) {
	f := newFixture(t)
	p := f.ev.Inclusion[2].Proof
	p[len(p)-1] = flipBit(t, p[len(p)-1])
	code, _, errOut := verify(t, f.key.vkey, f.ev)
	wantFailure(t, code, errOut, "inclusion[2] index=12")
}

func TestRejectsTruncatedInclusionProof(t *testing.T) {
	f := newFixture(t)
	f.ev.Inclusion[0].Proof = f.ev.Inclusion[0].Proof[1:]
	code, _, errOut := verify(t, f.key.vkey, f.ev)
	wantFailure(t, code, errOut, "inclusion[0] index=0")
}

func TestRejectsIndexBeyondTree(t *testing.T) {
	f := newFixture(t)
	f.ev.Inclusion[0].Index = 13
	code, _, errOut := verify(t, f.key.vkey, f.ev)
	wantFailure(t, code, errOut, "inclusion[0] index=13")
}

func TestRejectsTamperedConsistencyProof(t *testing.T) {
	f := newFixture(t)
	p := f.ev.Consistency[1].Proof
	p[0] = flipBit(t, p[0])
	code, _, errOut := verify(t, f.key.vkey, f.ev)
	wantFailure(t, code, errOut, "consistency[1] 7 -> 13")
}

func TestRejectsWrongKey(t *testing.T) {
	f := newFixture(t)
	// The same name with another key, then another name altogether.
	for _, other := range []key{newKey(t, origin), newKey(t, "other.example.test")} {
		code, out, errOut := verify(t, other.vkey, f.ev)
		wantFailure(t, code, errOut, "checkpoint")
		if out != "" {
			t.Fatalf("stdout %q, want nothing", out)
		}
	}
}

// An old checkpoint signed under the log's name by another key does not pass either:
// every checkpoint must be signed by the one trusted key.
func TestRejectsOldCheckpointByOtherKey(t *testing.T) {
	f := newFixture(t)
	f.ev.Consistency[1].Old = f.log.checkpoint(t, newKey(t, origin), 7)
	code, _, errOut := verify(t, f.key.vkey, f.ev)
	wantFailure(t, code, errOut, "consistency[1] old checkpoint")
}

// A checkpoint edited after signing (a larger size claimed) fails its signature.
func TestRejectsEditedCheckpoint(t *testing.T) {
	f := newFixture(t)
	f.ev.Checkpoint = strings.Replace(f.ev.Checkpoint, "\n13\n", "\n14\n", 1)
	code, _, errOut := verify(t, f.key.vkey, f.ev)
	wantFailure(t, code, errOut, "checkpoint")
}

// A log that signed two histories parting after record 3: neither the forked old
// checkpoint with the real proof nor the real old checkpoint with the fork's proof is
// consistent with the real new checkpoint.
func TestRejectsForkedHistory(t *testing.T) {
	f := newFixture(t)
	fork := newLog(t, 13, 4, "fork")
	if fork.root(t, 4) != f.log.root(t, 4) || fork.root(t, 7) == f.log.root(t, 7) {
		t.Fatal("the fork should share 4 records and part after them")
	}
	honest := f.log.consistency(t, f.key, 13, 7)
	forked := fork.consistency(t, f.key, 13, 7)

	f.ev.Consistency = []jsConsistency{{Old: forked.Old, Proof: honest.Proof}}
	code, _, errOut := verify(t, f.key.vkey, f.ev)
	wantFailure(t, code, errOut, "consistency[0] 7 -> 13")

	f.ev.Consistency = []jsConsistency{{Old: honest.Old, Proof: forked.Proof}}
	code, _, errOut = verify(t, f.key.vkey, f.ev)
	wantFailure(t, code, errOut, "consistency[0] 7 -> 13")

	// The shared prefix is consistent with both histories.
	f.ev.Consistency = []jsConsistency{fork.consistency(t, f.key, 13, 4)}
	f.ev.Checkpoint = fork.checkpoint(t, f.key, 13)
	f.ev.Inclusion = nil
	if code, out, errOut := verify(t, f.key.vkey, f.ev); code != 0 || !strings.HasSuffix(out, "consistency ok: 4 -> 13\n") {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
}

// An "old" checkpoint larger than the new one is not older.
func TestRejectsOldCheckpointLargerThanNew(t *testing.T) {
	f := newFixture(t)
	f.ev.Checkpoint = f.log.checkpoint(t, f.key, 7)
	f.ev.Inclusion = nil
	f.ev.Consistency = []jsConsistency{{Old: f.log.checkpoint(t, f.key, 13)}}
	code, _, errOut := verify(t, f.key.vkey, f.ev)
	wantFailure(t, code, errOut, "consistency[0] 13 -> 7")
}

func TestRejectsOtherOrigin(t *testing.T) {
	f := newFixture(t)
	f.ev.Consistency[0].Old = signText(t, checkpointText("example.test/other-log", 1, f.log.root(t, 1)), f.key)
	code, _, errOut := verify(t, f.key.vkey, f.ev)
	wantFailure(t, code, errOut, "consistency[0]")
	if !strings.Contains(errOut, "origin") {
		t.Fatalf("stderr %q does not name the origin", errOut)
	}
}

// A correctly signed note whose text is not a well-formed checkpoint is rejected.
func TestRejectsSignedMalformedCheckpoint(t *testing.T) {
	f := newFixture(t)
	root := base64.StdEncoding.EncodeToString(make([]byte, 32))
	for _, text := range []string{
		origin + "\n013\n" + root + "\n",
		origin + "\n13\n" + root + "\n\nextension\n", // empty line before an extension
		origin + "\n13\n",
	} {
		f.ev.Checkpoint = signText(t, text, f.key)
		code, _, errOut := verify(t, f.key.vkey, f.ev)
		wantFailure(t, code, errOut, "checkpoint")
	}
}

func TestRejectsBadDocuments(t *testing.T) {
	f := newFixture(t)
	cp, _ := json.Marshal(f.ev.Checkpoint)
	good := base64.StdEncoding.EncodeToString(make([]byte, 32))
	for _, tc := range []struct{ doc, what string }{
		{`not json`, "parse evidence"},
		{`{}`, "parse evidence"},
		{`{"checkpoint": ` + string(cp) + `, "inclusions": []}`, "parse evidence"},
		{`{"checkpoint": ` + string(cp) + `} {}`, "parse evidence"},
		{`{"checkpoint": ""}`, "checkpoint"},
		{`{"checkpoint": ` + string(cp) + `, "inclusion": [{"record": "AA=="}]}`, "inclusion[0]"},
		{`{"checkpoint": ` + string(cp) + `, "inclusion": [{"index": 1}]}`, "inclusion[0]"},
		{`{"checkpoint": ` + string(cp) + `, "inclusion": [{"index": 1, "record": "A"}]}`, "inclusion[0] index=1"},
		{`{"checkpoint": ` + string(cp) + `, "inclusion": [{"index": 1, "record": "AA==", "proof": ["AAAA"]}]}`, "inclusion[0] index=1"},
		{`{"checkpoint": ` + string(cp) + `, "inclusion": [{"index": -1, "record": "AA==", "proof": ["` + good + `"]}]}`, "inclusion[0] index=-1"},
		{`{"checkpoint": ` + string(cp) + `, "consistency": [{"proof": []}]}`, "consistency[0]"},
	} {
		code, _, errOut := verifyBytes(t, f.key.vkey, []byte(tc.doc))
		wantFailure(t, code, errOut, tc.what)
	}
	var out, errOut bytes.Buffer
	code := run([]string{"-vkey", f.key.vkey, filepath.Join(t.TempDir(), "missing.json")}, nil, &out, &errOut)
	if code != 1 || !strings.HasPrefix(errOut.String(), "FAILED: read ") {
		t.Fatalf("exit %d, stderr %q", code, errOut.String())
	}
}

// Base64 is accepted only in its one canonical form, even where the bytes it decodes to
// would pass: the evidence has one reading.
func TestRejectsNonCanonicalBase64(t *testing.T) {
	f := newFixture(t)
	rec := f.ev.Inclusion[1].Record
	f.ev.Inclusion[1].Record = rec[:4] + "\n" + rec[4:]
	code, _, errOut := verify(t, f.key.vkey, f.ev)
	wantFailure(t, code, errOut, "inclusion[1] index=5")

	f = newFixture(t)
	p := f.ev.Consistency[1].Proof
	p[0] = p[0][:8] + "\r\n" + p[0][8:]
	code, _, errOut = verify(t, f.key.vkey, f.ev)
	wantFailure(t, code, errOut, "consistency[1] 7 -> 13")

	for _, s := range []string{"AA", "AB==", "AA=", "A===", "AA==\n", " AA==", "AA-_"} {
		if b, err := decodeBase64(s); err == nil {
			t.Errorf("decodeBase64(%q) = %x, want an error", s, b)
		}
	}
	if b, err := decodeBase64("AA=="); err != nil || !bytes.Equal(b, []byte{0}) {
		t.Errorf("decodeBase64(AA==) = %x, %v", b, err)
	}
}

func TestUsageErrors(t *testing.T) {
	f := newFixture(t)
	for _, args := range [][]string{
		{},
		{"evidence.json"},
		{"-vkey", f.key.vkey},
		{"-vkey", f.key.vkey, "a.json", "b.json"},
		{"-vkey", "not-a-key", "evidence.json"},
		{"-nosuchflag", "-vkey", f.key.vkey, "evidence.json"},
	} {
		var out, errOut bytes.Buffer
		if code := run(args, nil, &out, &errOut); code != 2 || errOut.Len() == 0 {
			t.Errorf("%q: exit %d, stderr %q; want 2 and a message", args, code, errOut.String())
		}
	}
}

func TestParseCheckpoint(t *testing.T) {
	root := make([]byte, 32)
	root[0], root[31] = 0xfe, 0x01
	r := base64.StdEncoding.EncodeToString(root)
	got, err := parseCheckpoint("example.test/log\n0\n" + r + "\n")
	if err != nil || got.Origin != "example.test/log" || got.Size != 0 || got.Root != tlog.Hash(root) {
		t.Fatalf("got %+v, %v", got, err)
	}
	got, err = parseCheckpoint("o\n9223372036854775807\n" + r + "\next one\next two\n")
	if err != nil || got.Size != 1<<63-1 {
		t.Fatalf("got %+v, %v", got, err)
	}
	for _, text := range []string{
		"",
		"o\n1\n" + r,                          // no final newline
		"o\n1\n",                              // no root line
		"\n1\n" + r + "\n",                    // empty origin
		"o\n1\n" + r + "\n\nx\n",              // empty extension line
		"o\n1\n" + r + "\n\n",                 // empty last line
		"o\n01\n" + r + "\n",                  // leading zero
		"o\n00\n" + r + "\n",                  // leading zero
		"o\n+1\n" + r + "\n",                  // sign
		"o\n-1\n" + r + "\n",                  // sign
		"o\n 1\n" + r + "\n",                  // space
		"o\n1 \n" + r + "\n",                  // space
		"o\n\n" + r + "\n",                    // empty size
		"o\n0x1\n" + r + "\n",                 // not decimal
		"o\n١\n" + r + "\n",                   // a non-ASCII digit
		"o\n9223372036854775808\n" + r + "\n", // beyond int64
		"o\n1\n" + r[:43] + "\n",              // unpadded
		"o\n1\n" + base64.StdEncoding.EncodeToString(root[:31]) + "\n",
		"o\n1\n" + base64.StdEncoding.EncodeToString(append(root, 0)) + "\n",
		"o\n1\n" + base64.URLEncoding.EncodeToString(append([]byte{0xff, 0xff, 0xff}, root[3:]...)) + "\n",
		"o\n1\n" + r[:42] + "B=\n", // non-zero padding bits
		"o\n1\n" + hexString(root) + "\n",
	} {
		if got, err := parseCheckpoint(text); err == nil {
			t.Errorf("parseCheckpoint(%q) = %+v, want an error", text, got)
		}
	}
}

func hexString(b []byte) string { return fmt.Sprintf("%x", b) }

// The hashes tlog checks are RFC 6962's, which is what mailhook's log must produce:
// a leaf is SHA-256(0x00 || record) and an inner node SHA-256(0x01 || left || right).
func TestHashesAreRFC6962(t *testing.T) {
	rec0, rec1 := []byte("a"), []byte("b")
	leaf0 := sha256.Sum256(append([]byte{0}, rec0...))
	leaf1 := sha256.Sum256(append([]byte{0}, rec1...))
	node := sha256.Sum256(append(append([]byte{1}, leaf0[:]...), leaf1[:]...))
	if tlog.RecordHash(rec0) != tlog.Hash(leaf0) {
		t.Fatal("leaf hash is not SHA-256(0x00 || record)")
	}
	l := &memLog{}
	l.add(t, rec0)
	l.add(t, rec1)
	if l.root(t, 2) != tlog.Hash(node) {
		t.Fatal("root of two records is not SHA-256(0x01 || leaf0 || leaf1)")
	}
}

// The real main, in a child process: its exit codes and where its output goes.
func TestMainExitCodes(t *testing.T) {
	f := newFixture(t)
	dir := t.TempDir()
	good := filepath.Join(dir, "good.json")
	data, _ := json.Marshal(f.ev)
	if err := os.WriteFile(good, data, 0o644); err != nil {
		t.Fatal(err)
	}
	f.ev.Inclusion[0].Record = flipBit(t, f.ev.Inclusion[0].Record)
	bad := filepath.Join(dir, "bad.json")
	data, _ = json.Marshal(f.ev)
	if err := os.WriteFile(bad, data, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args      []string
		code      int
		stdout    string
		stderrPfx string
	}{
		{[]string{"-vkey", f.key.vkey, good}, 0, fixtureOK, ""},
		{[]string{"-vkey", f.key.vkey, bad}, 1, "checkpoint ok: origin=" + origin + " size=13\n", "FAILED: inclusion[0] index=0 : "},
		{[]string{good}, 2, "", "usage: "},
	} {
		cmd := exec.Command(os.Args[0], tc.args...)
		cmd.Env = append(os.Environ(), "TLOGVERIFY_RUN_MAIN=1")
		var out, errOut bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errOut
		err := cmd.Run()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		if code != tc.code || out.String() != tc.stdout || !strings.HasPrefix(errOut.String(), tc.stderrPfx) ||
			(tc.stderrPfx == "" && errOut.Len() != 0) {
			t.Errorf("%q: exit %d\nstdout:\n%s\nstderr:\n%s", tc.args, code, out.String(), errOut.String())
		}
	}
}
