//! The fuzz targets' properties (`protocol::fuzzing`) on stable, bounded in count: the seed
//! corpus kept in `agent-bridge/fuzz/corpus/`, then mutations of it from a fixed-seed generator
//! (byte flips, boundary values, truncations, repeats and splices), so that every run tries the
//! same inputs and a failure names the one that broke. The cargo-fuzz targets explore further on
//! nightly from the same corpus.

#![allow(clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use fleet_access_agent_bridge::protocol::fuzzing;

/// Mutated inputs per seed.
const DECODE_MUTATIONS: usize = 20_000;
const SESSION_MUTATIONS: usize = 5_000;

/// An arbitrary origin for simulated time; only differences from it matter.
#[allow(clippy::disallowed_methods)]
fn origin() -> Instant {
    Instant::now()
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut seeds: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("corpus entry").path();
            let bytes = std::fs::read(&path).expect("corpus file");
            (path, bytes)
        })
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 3, "a seed corpus in {}", dir.display());
    seeds
}

/// xorshift64*: fixed seed, so every run tries the same inputs.
struct Mutator(u64);

impl Mutator {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// One to four edits of `seed`, sometimes spliced with `other`.
    fn mutate(&mut self, seed: &[u8], other: &[u8]) -> Vec<u8> {
        const BOUNDARY: [u8; 8] = [0x00, 0x01, 0x7f, 0x80, 0xff, 0x74, 0x70, b' '];
        let mut out = seed.to_vec();
        for _ in 0..=self.below(4) {
            match self.below(6) {
                0 if !out.is_empty() => {
                    let i = self.below(out.len());
                    out[i] ^= 1 << self.below(8);
                }
                1 if !out.is_empty() => {
                    let i = self.below(out.len());
                    out[i] = BOUNDARY[self.below(BOUNDARY.len())];
                }
                2 => out.truncate(self.below(out.len() + 1)),
                3 if !out.is_empty() => {
                    let start = self.below(out.len());
                    let end = (start + 1 + self.below(64)).min(out.len());
                    let repeated = out[start..end].to_vec();
                    let at = self.below(out.len() + 1);
                    out.splice(at..at, repeated);
                }
                4 => {
                    let cut = self.below(out.len() + 1);
                    let from = self.below(other.len() + 1);
                    out.truncate(cut);
                    out.extend_from_slice(&other[from..]);
                }
                _ => {
                    let at = self.below(out.len() + 1);
                    let value = self.next().to_be_bytes();
                    out.splice(at..at, value[..1 + self.below(8)].iter().copied());
                }
            }
        }
        out
    }
}

fn run(target: &str, mutations: usize, property: impl Fn(&[u8]) -> Result<(), String>) {
    let seeds = corpus(target);
    let mut mutator = Mutator(0x9E37_79B9_7F4A_7C15);
    for (i, (path, seed)) in seeds.iter().enumerate() {
        if let Err(broken) = property(seed) {
            panic!("{}: {broken}", path.display());
        }
        let other = &seeds[(i + 1) % seeds.len()].1;
        for n in 0..mutations {
            let input = mutator.mutate(seed, other);
            if let Err(broken) = property(&input) {
                panic!(
                    "mutation {n} of {}: {broken}\ninput: {input:02x?}",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn the_decoder_survives_the_mutated_corpus() {
    run("decode", DECODE_MUTATIONS, fuzzing::decode_round_trip);
}

#[test]
fn a_session_survives_the_mutated_corpus() {
    let origin = origin();
    run("session", SESSION_MUTATIONS, |data| {
        fuzzing::drive_session(data, origin)
    });
}
