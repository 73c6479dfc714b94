//! Random LLaMA models for benchmarks (`bench-train`) and memory-plan checks: a named shape with
//! random weights built straight into the engine's storage, with no checkpoint on disk.
//!
//! The frozen linears are generated as int8 values with one f32 scale per output row (what
//! `Llama::load` would produce after quantizing), so no f32 copy of a weight ever exists: a
//! LLaMA-7B shape builds in seconds (in parallel, one seeded generator per chunk of rows) and
//! needs no more memory than its int8 weights, plus one linear at a time on the host. Norm
//! weights are 1.0 (f32); the embedding and the output head are dense in the backend's
//! activation dtype with small random values (uniform, standard deviation 0.02, HF's
//! `initializer_range`). The int8 rows are uniform over [-127, 127] and the scales give every
//! linear a weight standard deviation of 1/√in, so activations keep unit scale from layer to
//! layer and the loss starts near ln(vocab).
//!
//! Random values are not a trained model's: in particular no activation column is an LLM.int8
//! outlier (|x| > 6), so the mixed-precision path of the int8 GEMM does almost no work. A
//! benchmark on a real checkpoint (`bench-train --model PATH`) includes it.

use rayon::prelude::*;

use super::config::LlamaConfig;
use super::llama::{Layer, Llama, LoadOptions};
use crate::backend::{Backend, Linear, LinearWeight, Tensor};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::{DType, HostData, HostTensor};

/// Standard deviation of the embedding and head values (HF LLaMA's `initializer_range`).
pub const EMBED_STD: f32 = 0.02;

/// Rows generated per parallel chunk (each chunk has its own seeded generator, so the values
/// do not depend on the number of threads).
const ROWS_PER_CHUNK: usize = 16;

/// The shapes `bench-train` knows by name: `memory::named_shape`'s (llama-7b, llama-13b,
/// smollm2-135m), plus `tiny` (2 layers, hidden 128, vocabulary 512: a smoke test that runs in
/// well under a second on the CPU and in the simulator).
pub fn shape(name: &str) -> Option<LlamaConfig> {
    if let Some(c) = crate::memory::named_shape(name) {
        return Some(c);
    }
    match name {
        "tiny" => Some(LlamaConfig {
            hidden_size: 128,
            intermediate_size: 256,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 32,
            vocab_size: 512,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_position_embeddings: 4096,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        }),
        _ => None,
    }
}

/// Every name `shape` accepts.
pub const SHAPE_NAMES: [&str; 4] = ["llama-7b", "llama-13b", "smollm2-135m", "tiny"];

/// `cfg` with fewer (or more) layers and/or another vocabulary size, for small CPU and
/// simulator runs of a big shape. Per-layer shapes are unchanged.
pub fn shrink(
    cfg: &LlamaConfig,
    layers: Option<usize>,
    vocab: Option<usize>,
) -> Result<LlamaConfig> {
    let mut c = cfg.clone();
    if let Some(l) = layers {
        if l == 0 {
            return Err(Error::Invalid("--layers must be at least 1".into()));
        }
        c.num_hidden_layers = l;
    }
    if let Some(v) = vocab {
        if v < 2 {
            return Err(Error::Invalid("--vocab must be at least 2".into()));
        }
        c.vocab_size = v;
        c.bos_token_id = c.bos_token_id.filter(|&b| (b as usize) < v);
        c.eos_token_ids.retain(|&e| (e as usize) < v);
    }
    c.validate().map_err(Error::Invalid)?;
    Ok(c)
}

/// A seed for one named piece of the model, mixed so that neighbouring indices give unrelated
/// streams.
fn sub_seed(seed: u64, a: u64, b: u64) -> u64 {
    let mut r = Rng::new(
        seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F),
    );
    r.next_u64()
}

/// Random int8 `[n, k]` (uniform bytes, -128 folded onto -127 so that the values stay in the
/// symmetric range absmax quantization produces) and per-row scales giving a weight standard
/// deviation of 1/√k.
/// `q` is reused from one linear to the next, so the host pages are touched once per model,
/// not once per linear.
fn random_int8(q: &mut Vec<i8>, n: usize, k: usize, seed: u64) -> Vec<f32> {
    q.resize(n * k, 0);
    q.par_chunks_mut((ROWS_PER_CHUNK * k).max(1))
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut rng = Rng::new(sub_seed(seed, c as u64, 1));
            let mut words = chunk.chunks_exact_mut(8);
            for w in &mut words {
                w.copy_from_slice(&bytemuck::cast::<u64, [i8; 8]>(rng.next_u64()));
            }
            let rest = words.into_remainder();
            let last = rng.next_u64().to_le_bytes();
            for (v, b) in rest.iter_mut().zip(last) {
                *v = b as i8;
            }
            for v in chunk.iter_mut() {
                *v = (*v).max(-127);
            }
        });
    // Each of -126..=127 with probability 1/256 and -127 with 2/256: standard deviation
    // √(E[x²] − E[x]²) = √(5460.5 − 0.246) ≈ 73.89.
    let std_int = (5460.5f64 - (127.0f64 / 256.0).powi(2)).sqrt();
    let scale = (1.0 / (std_int * (k as f64).sqrt())) as f32;
    vec![scale; n]
}

/// `n` values uniform with standard deviation `std`, generated in parallel straight into the
/// storage type (no f32 copy of a bf16 table).
fn uniform_values<T: Copy + Default + Send>(
    n: usize,
    std: f32,
    seed: u64,
    chunk: usize,
    conv: impl Fn(f32) -> T + Sync,
) -> Vec<T> {
    let bound = std * 3f32.sqrt();
    let mut v = vec![T::default(); n];
    v.par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(c, ch)| {
            let mut rng = Rng::new(sub_seed(seed, c as u64, 2));
            for x in ch {
                *x = conv(rng.range(-bound, bound));
            }
        });
    v
}

/// Random values uniform with standard deviation `std`, `[n, k]`, in `dtype`.
fn random_dense(n: usize, k: usize, std: f32, seed: u64, dtype: DType) -> Result<HostTensor> {
    let chunk = ROWS_PER_CHUNK * k;
    let data = match dtype {
        DType::F32 => HostData::F32(uniform_values(n * k, std, seed, chunk, |x| x)),
        DType::BF16 => HostData::BF16(uniform_values(
            n * k,
            std,
            seed,
            chunk,
            half::bf16::from_f32,
        )),
        DType::F16 => HostData::F16(uniform_values(n * k, std, seed, chunk, half::f16::from_f32)),
        other => {
            return Err(Error::Invalid(format!(
                "random dense weights in {other} are not supported"
            )))
        }
    };
    HostTensor::new(vec![n, k], data)
}

fn int8_linear<B: Backend>(
    be: &B,
    n: usize,
    k: usize,
    seed: u64,
    outlier_threshold: f32,
    scratch: &mut Vec<i8>,
) -> Result<Linear<B>> {
    let s = random_int8(scratch, n, k, seed);
    let t = HostTensor::new(vec![n, k], HostData::I8(std::mem::take(scratch)))?;
    let w = be.upload(&t);
    if let HostData::I8(v) = t.data {
        *scratch = v;
    }
    Ok(Linear {
        weight: LinearWeight::Int8 {
            w: w?,
            scale: be.upload(&HostTensor::f32(vec![n], s)?)?,
        },
        out_features: n,
        in_features: k,
        outlier_threshold,
    })
}

fn dense_linear<B: Backend>(be: &B, n: usize, k: usize, seed: u64) -> Result<Linear<B>> {
    let t = random_dense(n, k, EMBED_STD, seed, be.activation_dtype())?;
    Ok(Linear {
        weight: LinearWeight::Dense(be.upload(&t)?),
        out_features: n,
        in_features: k,
        outlier_threshold: 0.0,
    })
}

fn ones<B: Backend>(be: &B, d: usize) -> Result<Tensor<B>> {
    be.upload(&HostTensor::f32(vec![d], vec![1.0; d])?)
}

/// A LLaMA of shape `cfg` with random int8 linears, built on `be` (outlier threshold 6.0, the
/// `LoadOptions` default). The same seed gives the same weights on every machine.
pub fn random_llama<B: Backend>(be: &B, cfg: &LlamaConfig, seed: u64) -> Result<Llama<B>> {
    random_llama_with(be, cfg, seed, LoadOptions::default().outlier_threshold)
}

/// `random_llama` with an explicit LLM.int8 outlier threshold (0 disables the decomposition).
pub fn random_llama_with<B: Backend>(
    be: &B,
    cfg: &LlamaConfig,
    seed: u64,
    outlier_threshold: f32,
) -> Result<Llama<B>> {
    cfg.validate()
        .map_err(|m| Error::Invalid(format!("random model shape: {m}")))?;
    super::llama::check_outlier_threshold(outlier_threshold)?;
    let (d, f, qd, kvd) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.q_dim(),
        cfg.kv_dim(),
    );
    let mut scratch: Vec<i8> = vec![];
    let layers = (0..cfg.num_hidden_layers)
        .map(|l| {
            let mut lin = |which: u64, n: usize, k: usize| {
                int8_linear(
                    be,
                    n,
                    k,
                    sub_seed(seed, l as u64 + 1, which),
                    outlier_threshold,
                    &mut scratch,
                )
            };
            Ok(Layer {
                attn_norm: ones(be, d)?,
                q: lin(10, qd, d)?,
                k: lin(11, kvd, d)?,
                v: lin(12, kvd, d)?,
                o: lin(13, d, qd)?,
                ffn_norm: ones(be, d)?,
                gate: lin(14, f, d)?,
                up: lin(15, f, d)?,
                down: lin(16, d, f)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let v = cfg.vocab_size;
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(dense_linear(be, v, d, sub_seed(seed, 0, 21))?)
    };
    Ok(Llama {
        config: cfg.clone(),
        embed: dense_linear(be, v, d, sub_seed(seed, 0, 20))?,
        layers,
        norm: ones(be, d)?,
        lm_head,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::model::llama::Logits;

    fn int8_of<B: Backend>(l: &Linear<B>) -> (&Tensor<B>, &Tensor<B>) {
        match &l.weight {
            LinearWeight::Int8 { w, scale } => (w, scale),
            LinearWeight::Dense(_) => panic!("expected an int8 linear"),
        }
    }

    fn dense_of<B: Backend>(l: &Linear<B>) -> &Tensor<B> {
        match &l.weight {
            LinearWeight::Dense(t) => t,
            LinearWeight::Int8 { .. } => panic!("expected a dense linear"),
        }
    }

    #[test]
    fn the_model_has_the_shapes_of_its_config() {
        let be = Cpu::new();
        for tied in [false, true] {
            let cfg = LlamaConfig {
                tie_word_embeddings: tied,
                ..shape("tiny").unwrap()
            };
            let m = random_llama(&be, &cfg, 3).unwrap();
            let (d, f, qd, kvd, v) = (
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.q_dim(),
                cfg.kv_dim(),
                cfg.vocab_size,
            );
            assert_eq!(m.config, cfg);
            assert_eq!(m.layers.len(), cfg.num_hidden_layers);
            for lay in &m.layers {
                for (lin, n, k) in [
                    (&lay.q, qd, d),
                    (&lay.k, kvd, d),
                    (&lay.v, kvd, d),
                    (&lay.o, d, qd),
                    (&lay.gate, f, d),
                    (&lay.up, f, d),
                    (&lay.down, d, f),
                ] {
                    let (w, s) = int8_of(lin);
                    assert_eq!((lin.out_features, lin.in_features), (n, k));
                    assert_eq!(w.shape, vec![n, k]);
                    assert_eq!(w.dtype, DType::I8);
                    assert_eq!(s.shape, vec![n]);
                    assert_eq!(s.dtype, DType::F32);
                    assert_eq!(lin.outlier_threshold, 6.0);
                }
                for norm in [&lay.attn_norm, &lay.ffn_norm] {
                    assert_eq!(norm.shape, vec![d]);
                    assert_eq!(norm.dtype, DType::F32);
                    assert!(be
                        .download(norm)
                        .unwrap()
                        .to_f32()
                        .unwrap()
                        .iter()
                        .all(|&x| x == 1.0));
                }
            }
            assert_eq!(dense_of(&m.embed).shape, vec![v, d]);
            assert_eq!(dense_of(&m.embed).dtype, be.activation_dtype());
            assert_eq!(m.lm_head.is_some(), !tied);
            if let Some(h) = &m.lm_head {
                assert_eq!(dense_of(h).shape, vec![v, d]);
            }
            assert_eq!(m.norm.shape, vec![d]);
        }
    }

    #[test]
    fn weights_are_deterministic_centred_and_scaled() {
        let be = Cpu::new();
        let cfg = shape("tiny").unwrap();
        let a = random_llama(&be, &cfg, 9).unwrap();
        let b = random_llama(&be, &cfg, 9).unwrap();
        let c = random_llama(&be, &cfg, 10).unwrap();
        let w = |m: &Llama<Cpu>| be.download(int8_of(&m.layers[1].gate).0).unwrap();
        assert_eq!(w(&a), w(&b));
        assert_ne!(w(&a), w(&c));
        let HostData::I8(q) = w(&a).data else {
            panic!("int8 weights")
        };
        let q: Vec<f32> = q.iter().map(|&x| x as f32).collect();
        let mean = q.iter().map(|&x| x as f64).sum::<f64>() / q.len() as f64;
        let var = q.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / q.len() as f64;
        assert!(mean.abs() < 3.0, "mean {mean}");
        assert!((var.sqrt() - 73.89).abs() < 3.0, "std {}", var.sqrt());
        assert!(q.iter().all(|&x| (-127.0..=127.0).contains(&x)));
        // Layers differ from each other.
        let g0 = be.download(int8_of(&a.layers[0].gate).0).unwrap();
        assert_ne!(g0, w(&a));
        // Embedding: small, centred values.
        let LinearWeight::Dense(e) = &a.embed.weight else {
            panic!("dense embedding")
        };
        let e = be.download(e).unwrap().to_f32().unwrap();
        let std = (e.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / e.len() as f64).sqrt();
        assert!(
            (std - EMBED_STD as f64).abs() < 0.002,
            "embedding std {std}"
        );
    }

    #[test]
    fn a_forward_pass_gives_finite_logits_near_uniform() {
        let be = Cpu::new();
        let cfg = shape("tiny").unwrap();
        let m = random_llama(&be, &cfg, 1).unwrap();
        let tokens: Vec<u32> = (0..16).map(|i| (i * 31 % 512) as u32).collect();
        let mut cache = m.new_cache(&be, tokens.len()).unwrap();
        let logits = m
            .forward(&be, &tokens, &mut cache, Logits::All)
            .unwrap()
            .to_f32()
            .unwrap();
        assert_eq!(logits.len(), 16 * cfg.vocab_size);
        assert!(logits.iter().all(|x| x.is_finite()));
        // Logits of a random head on a normalized hidden state: standard deviation about
        // 0.02 · √hidden, far below anything that would make the loss blow up.
        let max = logits.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(max < 5.0, "max |logit| {max}");
    }

    #[test]
    fn shrink_overrides_layers_and_vocabulary() {
        let c = shape("llama-7b").unwrap();
        let s = shrink(&c, Some(2), Some(1000)).unwrap();
        assert_eq!((s.num_hidden_layers, s.vocab_size), (2, 1000));
        assert_eq!(s.hidden_size, c.hidden_size);
        assert_eq!(shrink(&c, None, None).unwrap(), c);
        assert!(shrink(&c, Some(0), None).is_err());
        assert!(shrink(&c, None, Some(1)).is_err());
        assert!(shape("llama-70b").is_none());
        for n in SHAPE_NAMES {
            assert!(shape(n).is_some(), "{n}");
        }
    }
}
