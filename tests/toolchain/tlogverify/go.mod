// Wrapper module for tlogverify, which checks mailhook's audit evidence (signed
// checkpoints, inclusion and consistency proofs) with golang.org/x/mod's sumdb code.
module mailhook.test/tlogverify

go 1.26.0

require golang.org/x/mod v0.43.0
