//! Applying an arbitrary BSDF2 patch body to a small source: never a panic, never more output
//! than the limit, never a source read outside the source. The input's first byte chooses the
//! three stream codecs (so the fuzzer need not find the magic first); the rest is the patch
//! after its 8-byte magic (lengths, then streams).
#![no_main]

use keelos::update::bspatch::{Patcher, Step};
use libfuzzer_sys::fuzz_target;

const LIMIT: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let codecs = [choice % 3, (choice / 3) % 3, (choice / 9) % 3];
    let mut patch = b"BSDF2".to_vec();
    patch.extend_from_slice(&codecs);
    patch.extend_from_slice(rest);
    let source: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let Ok(mut p) = Patcher::new(patch, source.len() as u64, LIMIT) else {
        return;
    };
    let mut produced = 0u64;
    while let Ok(step) = p.step() {
        match step {
            Step::NeedSource { offset, len } => {
                let end = offset as usize + len;
                assert!(end <= source.len(), "source read {offset}+{len} outside the source");
                p.source(source[offset as usize..end].to_vec());
            }
            Step::Output(b) => {
                produced += b.len() as u64;
                assert!(produced <= LIMIT, "output beyond its limit");
            }
            Step::Done => break,
        }
    }
});
