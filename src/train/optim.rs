//! The learning-rate schedule and the optimizer step (global-norm clipping, then AdamW on every
//! LoRA tensor).

use crate::backend::{AdamW, Backend};
use crate::error::Result;

use super::params::DevAdapter;

/// Learning rate of optimizer update `step` (0-based), Hugging Face's
/// `get_cosine_schedule_with_warmup`: linear from 0 over `warmup` updates, then half a cosine
/// down to 0 at `total`. As in HF, update 0 runs at `lr · 0 / warmup` when there is a warm-up.
pub fn cosine_lr(base: f32, step: usize, warmup: usize, total: usize) -> f32 {
    if step < warmup {
        return base * step as f32 / warmup.max(1) as f32;
    }
    // Clamped at the end (HF's formula would rise again past `total`).
    let progress = ((step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64).min(1.0);
    let f = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    base * f.max(0.0) as f32
}

/// Global gradient norm before clipping, and the factor the gradients were multiplied by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClipInfo {
    pub grad_norm: f64,
    pub factor: f32,
}

/// One optimizer update over every adapted projection: clip by the global norm (PyTorch's
/// `clip_grad_norm_`: factor max_norm / (norm + 1e-6) when above; `max_norm` 0 disables), then
/// AdamW with update number `step` (1-based, for the bias correction).
pub fn optimizer_step<B: Backend>(
    be: &B,
    adapter: &mut DevAdapter<B>,
    hp: AdamW,
    step: u32,
    max_norm: f32,
) -> Result<ClipInfo> {
    let grad_norm = adapter.grad_sq_norm(be)?.sqrt();
    let factor = if max_norm > 0.0 && grad_norm > max_norm as f64 {
        (max_norm as f64 / (grad_norm + 1e-6)) as f32
    } else {
        1.0
    };
    for p in adapter.layers.values_mut() {
        be.adamw(
            &mut p.lora.a,
            &p.grad_a,
            &mut p.m_a,
            &mut p.v_a,
            hp,
            step,
            factor,
        )?;
        be.adamw(
            &mut p.lora.b,
            &p.grad_b,
            &mut p.m_b,
            &mut p.v_b,
            hp,
            step,
            factor,
        )?;
    }
    Ok(ClipInfo { grad_norm, factor })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_schedule_matches_the_hf_formula_at_landmarks() {
        // warm-up: 0, lr/2 halfway; peak at the end of warm-up; half at the middle of the decay;
        // zero at the end and after.
        assert_eq!(cosine_lr(1.0, 0, 10, 110), 0.0);
        assert!((cosine_lr(1.0, 5, 10, 110) - 0.5).abs() < 1e-7);
        assert!((cosine_lr(1.0, 10, 10, 110) - 1.0).abs() < 1e-7);
        assert!((cosine_lr(1.0, 60, 10, 110) - 0.5).abs() < 1e-6);
        assert!(cosine_lr(1.0, 110, 10, 110).abs() < 1e-7);
        assert!(cosine_lr(1.0, 200, 10, 110).abs() < 1e-6);
        // No warm-up: the first update runs at the full rate.
        assert_eq!(cosine_lr(2e-4, 0, 0, 100), 2e-4);
    }
}
