//! FNV-1a (64-bit): the fingerprints that tie a saved file to the data it was made from (a
//! training checkpoint, a `rec prune` scores file). Not for security: a mismatch check.

#[derive(Clone, Debug)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xCBF2_9CE4_8422_2325)
    }
}

impl Fnv1a {
    /// One FNV-1a step over a whole value (`h = (h ^ x) · prime`).
    pub fn mix(&mut self, x: u64) {
        self.0 = (self.0 ^ x).wrapping_mul(0x0000_0100_0000_01B3);
    }
    /// FNV-1a over bytes, one step each.
    pub fn bytes(&mut self, bytes: &[u8]) {
        bytes.iter().for_each(|&b| self.mix(b as u64));
    }
    /// As 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_follow_the_published_fnv1a_64_vectors() {
        // The FNV authors' test vectors for FNV-1a 64.
        for (text, want) in [
            ("", "cbf29ce484222325"),
            ("a", "af63dc4c8601ec8c"),
            ("foobar", "85944171f73967e8"),
        ] {
            let mut h = Fnv1a::default();
            h.bytes(text.as_bytes());
            assert_eq!(h.hex(), want, "{text:?}");
        }
    }
}
