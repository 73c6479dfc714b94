//! What sampling a token means, exactly, on every backend.
//!
//! A row of f32 logits, a [`SamplingParams`] and one uniform number `u ∈ [0, 1)` from the caller
//! determine the token. The CPU and the GPU must pick the *same* token for the same inputs, so
//! every decision is made in integer arithmetic on quantities both compute bit-identically:
//!
//! 1. Rank: tokens are ordered by their raw logit through [`order_key`] (a monotone map of the
//!    f32 bits to u32). Top-k keeps every token whose key is ≥ the k-th largest key (ties at the
//!    threshold are all kept, as Hugging Face's `TopKLogitsWarper` does).
//! 2. Weight: `w = weight((logit − max) · (1/temperature))`, a fixed-point `exp` with
//!    [`WEIGHT_BITS`] fractional bits computed only with IEEE-exact operations (multiply,
//!    subtract, floor, fused multiply-add, a power-of-two scale, truncation), so the GPU and the
//!    CPU get the same integer. The largest logit always weighs exactly 2^40; a token below
//!    2^-40 of it weighs 0 and is never drawn (a probability floor of 9·10⁻¹³ relative to the
//!    most likely token).
//! 3. Top-p: among the top-k survivors, a token is kept when the weight of the survivors with a
//!    strictly larger key is < `top_p · W` (W = their total weight, the product taken in f64) or
//!    is 0 — the smallest set of leading logit values whose mass reaches `top_p`, ties kept
//!    together, the most likely token always kept (`p → 0` is greedy-with-ties).
//! 4. Draw: `r = min(⌊u · W'⌋, W' − 1)` (f64 product, W' = the kept weight); the token is the
//!    first index, in vocabulary order, whose running kept weight exceeds `r`.
//!
//! Integer sums are associative, so a GPU block may add in any order and still agree. Temperature
//! 0 is greedy: the lowest index holding the largest logit. A row with a NaN or +∞ logit, or no
//! finite logit at all, has no distribution: backends report it as an error naming the row.
//!
//! [`sample_row`] is the plain, sort-based reference; `kernels/sampling.cu` computes the same
//! thresholds with radix selects instead of sorting.

use crate::error::{Error, Result};

/// Fractional bits of the fixed-point weights (see the module comment). A vocabulary of up to
/// 2^22 tokens sums below 2^63.
pub const WEIGHT_BITS: i32 = 40;

/// The token a kernel writes for a row without a distribution (NaN / +∞ / all −∞).
pub const BAD_ROW: u32 = u32::MAX;

/// Per-sequence sampling settings (Hugging Face order: temperature, then top-k, then top-p).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy; otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep the k most likely tokens (ties at the k-th kept too); 0 = no limit.
    pub top_k: u32,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 = no limit.
    pub top_p: f32,
}

impl SamplingParams {
    pub const GREEDY: SamplingParams = SamplingParams {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    };
    /// ITREK / RecRanker inference settings, the default for ranking prompts (with
    /// [`ITREK_MAX_NEW_TOKENS`]).
    pub const ITREK: SamplingParams = SamplingParams {
        temperature: 0.1,
        top_k: 10,
        top_p: 0.1,
    };

    /// A named preset: `greedy` or `itrek`.
    pub fn preset(name: &str) -> Result<SamplingParams> {
        match name {
            "greedy" => Ok(Self::GREEDY),
            "itrek" => Ok(Self::ITREK),
            other => Err(Error::Invalid(format!(
                "unknown sampling preset '{other}' (known: greedy, itrek)"
            ))),
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::Invalid(format!(
                "temperature must be a finite number ≥ 0 (0 = greedy), got {}",
                self.temperature
            )));
        }
        if self.temperature > 0.0 && !(1.0 / self.temperature).is_finite() {
            return Err(Error::Invalid(format!(
                "temperature {:e} is too small to sample with (1/temperature overflows f32); \
                 0 means greedy, which is what it would pick",
                self.temperature
            )));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(Error::Invalid(format!(
                "top-p must be in [0, 1] (1 = off), got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Up to this many new tokens with the ITREK preset.
pub const ITREK_MAX_NEW_TOKENS: usize = 300;

/// Checks a batch's parameters and uniforms before any backend runs it.
pub fn check_batch(rows: usize, params: &[SamplingParams], uniforms: &[f32]) -> Result<()> {
    if params.len() != rows || uniforms.len() != rows {
        return Err(Error::Shape(format!(
            "sample: {rows} rows of logits but {} parameter sets and {} uniforms",
            params.len(),
            uniforms.len()
        )));
    }
    for (b, (p, u)) in params.iter().zip(uniforms).enumerate() {
        p.validate()
            .map_err(|e| Error::Invalid(format!("sample: row {b}: {e}")))?;
        if !(0.0..1.0).contains(u) {
            return Err(Error::Invalid(format!(
                "sample: row {b}: the uniform number must be in [0, 1), got {u}"
            )));
        }
    }
    Ok(())
}

/// The error for a row whose logits have no distribution.
pub fn bad_row_error(row: usize) -> Error {
    Error::Invalid(format!(
        "sample: row {row} of the logits has a NaN or +inf, or no finite value"
    ))
}

/// Monotone map of an f32 (not NaN) to u32: `a < b ⇔ order_key(a) < order_key(b)`, with
/// −0 just below +0.
pub fn order_key(x: f32) -> u32 {
    let b = x.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// Taylor coefficients of 2^f = Σ (f·ln 2)^i / i!, i = 0..8 (error < 1.1·10⁻⁷ on [0, 1)).
const EXP2_POLY: [f32; 9] = [
    1.0,
    std::f32::consts::LN_2, // 0.6931472, as written in kernels/sampling.cu
    0.2402265,
    0.05550411,
    0.009618129,
    0.0013333558,
    0.0001540353,
    1.5252734e-5,
    1.3215487e-6,
];

/// `⌊e^d · 2^WEIGHT_BITS⌋` for `d ≤ 0` (approximately: 2^(d·log2 e) through a polynomial), with
/// IEEE-exact steps only, mirrored op for op by `rf_sample_weight` in kernels/sampling.cu.
pub fn weight(d: f32) -> u64 {
    let t = d * std::f32::consts::LOG2_E;
    if t.is_nan() || t <= -(WEIGHT_BITS as f32 + 1.0) {
        return 0;
    }
    let n = t.floor();
    let f = t - n; // exact: the fractional bits of t
    let mut p = EXP2_POLY[8];
    for c in EXP2_POLY[..8].iter().rev() {
        p = p.mul_add(f, *c);
    }
    let e = n as i32 + WEIGHT_BITS; // −1 ..= 40 because −41 < t ≤ 0
    let scale = f32::from_bits(((127 + e) as u32) << 23);
    (p * scale) as u64
}

/// The largest logit of a row, or `None` if the row has no distribution.
fn row_max(logits: &[f32]) -> Option<f32> {
    let mut m = f32::NEG_INFINITY;
    for &x in logits {
        if x.is_nan() || x == f32::INFINITY {
            return None;
        }
        m = m.max(x);
    }
    (m > f32::NEG_INFINITY).then_some(m)
}

/// The kept tokens' weights (0 for tokens outside top-k ∩ top-p), as the module comment
/// defines them; `None` for a row without a distribution. Temperature 0 gives the greedy token
/// weight 1 and every other token 0.
pub fn kept_weights(logits: &[f32], p: &SamplingParams) -> Option<Vec<u64>> {
    let max = row_max(logits)?;
    let v = logits.len();
    let mut w = vec![0u64; v];
    if p.temperature == 0.0 {
        let arg = logits.iter().position(|&x| x == max)?;
        w[arg] = 1;
        return Some(w);
    }
    let keys: Vec<u32> = logits.iter().map(|&x| order_key(x)).collect();
    let mut desc = keys.clone();
    desc.sort_unstable_by(|a, b| b.cmp(a));
    let kth = if p.top_k > 0 && (p.top_k as usize) < v {
        desc[p.top_k as usize - 1]
    } else {
        0
    };
    let inv_t = 1.0 / p.temperature;
    for i in 0..v {
        if keys[i] >= kth {
            w[i] = weight((logits[i] - max) * inv_t);
        }
    }
    if p.top_p < 1.0 {
        let total: u64 = w.iter().sum();
        let thr = p.top_p as f64 * total as f64;
        // Walk the distinct keys from the top; `above` = weight of strictly larger keys.
        let mut order: Vec<usize> = (0..v).filter(|&i| keys[i] >= kth).collect();
        order.sort_by(|&a, &b| keys[b].cmp(&keys[a]));
        let (mut above, mut cut, mut i) = (0u64, 0u32, 0usize);
        while i < order.len() {
            let key = keys[order[i]];
            if !((above as f64) < thr || above == 0) {
                break;
            }
            cut = key;
            while i < order.len() && keys[order[i]] == key {
                above += w[order[i]];
                i += 1;
            }
        }
        for j in 0..v {
            if keys[j] < cut {
                w[j] = 0;
            }
        }
    }
    Some(w)
}

/// The token drawn with uniform `u ∈ [0, 1)`: the plain reference every backend must equal.
/// `None` for a row without a distribution.
pub fn sample_row(logits: &[f32], p: &SamplingParams, u: f32) -> Option<u32> {
    let w = kept_weights(logits, p)?;
    let total: u64 = w.iter().sum();
    let r = ((u as f64 * total as f64) as u64).min(total - 1);
    let mut cum = 0u64;
    for (i, &wi) in w.iter().enumerate() {
        cum += wi;
        if cum > r {
            return Some(i as u32);
        }
    }
    None // unreachable: cum ends at total > r
}

/// `log softmax(logits)[id]` for each id (temperature 1, no filtering); NaN for an id outside
/// the vocabulary. f64 accumulation.
pub fn token_logprobs_row(logits: &[f32], ids: &[u32]) -> Vec<f32> {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let sum: f64 = logits.iter().map(|&x| ((x - m) as f64).exp()).sum();
    let lse = m as f64 + sum.ln();
    ids.iter()
        .map(|&id| match logits.get(id as usize) {
            Some(&x) => (x as f64 - lse) as f32,
            None => f32::NAN,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_key_is_monotone() {
        let xs = [
            f32::NEG_INFINITY,
            -1e30,
            -2.5,
            -1e-40,
            -0.0,
            0.0,
            1e-40,
            1.0,
            3e38,
            f32::INFINITY,
        ];
        for w in xs.windows(2) {
            assert!(order_key(w[0]) < order_key(w[1]), "{} vs {}", w[0], w[1]);
        }
    }

    #[test]
    fn weight_is_exp_to_seven_digits() {
        assert_eq!(weight(0.0), 1u64 << WEIGHT_BITS);
        assert_eq!(weight(-0.0), 1u64 << WEIGHT_BITS);
        assert_eq!(weight(f32::NEG_INFINITY), 0);
        assert_eq!(weight(-40.0), 0); // e^-40 · 2^40 ≈ 0.0047
        let mut d = 0.0f32;
        while d > -25.0 {
            let want = (d as f64).exp() * (1u64 << WEIGHT_BITS) as f64;
            let got = weight(d) as f64;
            // Polynomial (1.1e-7) + f32 rounding of t, f and the product (3 · 6e-8, amplified by
            // |t| ≤ 36 for t's rounding: 36 · 6e-8 · ln 2) + truncation (1 unit).
            let tol = want * (1.1e-7 + 1.8e-7 + 1.5e-6) + 1.0;
            assert!((got - want).abs() <= tol, "d {d}: {got} vs {want}");
            d -= 0.0173;
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let l = [1.0, 3.0, -2.0, 3.0];
        for u in [0.0, 0.5, 0.999] {
            assert_eq!(sample_row(&l, &SamplingParams::GREEDY, u), Some(1));
        }
    }

    #[test]
    fn rows_without_a_distribution_are_refused() {
        let p = SamplingParams::ITREK;
        assert_eq!(sample_row(&[1.0, f32::NAN], &p, 0.5), None);
        assert_eq!(sample_row(&[1.0, f32::INFINITY], &p, 0.5), None);
        assert_eq!(sample_row(&[f32::NEG_INFINITY; 3], &p, 0.5), None);
        assert_eq!(sample_row(&[], &p, 0.5), None);
    }

    #[test]
    fn top_k_keeps_ties_and_top_p_keeps_the_leader() {
        let l = [0.0, 2.0, 1.0, 2.0, 1.0, -1.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 3,
            top_p: 1.0,
        };
        let w = kept_weights(&l, &p).unwrap();
        // The 3rd largest is 1.0, so both 1.0s are kept with both 2.0s.
        assert_eq!(
            w.iter().map(|&x| x > 0).collect::<Vec<_>>(),
            [false, true, true, true, true, false]
        );
        let p0 = SamplingParams { top_p: 0.0, ..p };
        let w = kept_weights(&l, &p0).unwrap();
        assert_eq!(
            w.iter().map(|&x| x > 0).collect::<Vec<_>>(),
            [false, true, false, true, false, false]
        );
    }

    #[test]
    fn bad_parameters_are_named() {
        let bad = [
            SamplingParams {
                temperature: -1.0,
                ..SamplingParams::ITREK
            },
            SamplingParams {
                temperature: f32::NAN,
                ..SamplingParams::ITREK
            },
            SamplingParams {
                top_p: 1.5,
                ..SamplingParams::ITREK
            },
        ];
        for p in bad {
            assert!(check_batch(1, &[p], &[0.5]).is_err(), "{p:?}");
        }
        // A positive temperature whose reciprocal overflows (a subnormal) is refused by name;
        // a small normal one is taken.
        let tiny = SamplingParams {
            temperature: 1e-45,
            ..SamplingParams::ITREK
        };
        let e = check_batch(1, &[tiny], &[0.5]).unwrap_err().to_string();
        assert!(e.contains("too small"), "{e}");
        let least = SamplingParams {
            temperature: 1e-37,
            ..SamplingParams::ITREK
        };
        assert!(check_batch(1, &[least], &[0.5]).is_ok());
        assert!(check_batch(1, &[SamplingParams::ITREK], &[1.0]).is_err());
        assert!(check_batch(2, &[SamplingParams::ITREK], &[0.5]).is_err());
        assert!(SamplingParams::preset("nucleus").is_err());
    }
}
