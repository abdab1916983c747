//! A reproducible pseudo-random source for generated test inputs (the secret corpus, the
//! fuzz invariants), with no dependency: xorshift64*.

pub struct Rng(pub u64);

#[allow(dead_code)]
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// One byte of `pool`, as a character.
    pub fn pick(&mut self, pool: &[u8]) -> char {
        pool[(self.next() % pool.len() as u64) as usize] as char
    }

    /// `n` bytes of `pool`.
    pub fn string(&mut self, pool: &[u8], n: usize) -> String {
        (0..n).map(|_| self.pick(pool)).collect()
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}
