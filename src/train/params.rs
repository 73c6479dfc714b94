//! The trainable state on a backend: every LoRA A and B (f32 master weights), their gradients
//! (accumulated across micro-batches) and AdamW's two moments.

use std::collections::BTreeMap;

use crate::backend::{Backend, Lora, Tensor};
use crate::error::{Error, Result};
use crate::model::llama::AdapterView;
use crate::model::lora::{HostAdapter, HostLora, LoraConfig, Target};
use crate::tensor::{DType, HostTensor};

/// Gradients on the host: (layer, target), dA, dB.
pub type HostGrads = Vec<((usize, Target), Vec<f32>, Vec<f32>)>;

/// One adapted projection on the backend.
pub struct DevLoraParams<B: Backend> {
    pub lora: Lora<B>,
    pub grad_a: Tensor<B>,
    pub grad_b: Tensor<B>,
    pub m_a: Tensor<B>,
    pub v_a: Tensor<B>,
    pub m_b: Tensor<B>,
    pub v_b: Tensor<B>,
}

pub struct DevAdapter<B: Backend> {
    pub config: LoraConfig,
    pub base_model: String,
    pub layers: BTreeMap<(usize, Target), DevLoraParams<B>>,
}

fn f32_tensor<B: Backend>(be: &B, shape: [usize; 2], v: &[f32]) -> Result<Tensor<B>> {
    be.upload(&HostTensor::f32(shape.to_vec(), v.to_vec())?)
}

fn download_f32<B: Backend>(be: &B, t: &Tensor<B>) -> Result<Vec<f32>> {
    be.download(t)?.to_f32()
}

impl<B: Backend> DevAdapter<B> {
    /// The adapter as the inference forward applies it (`Llama::forward_logits_with`).
    pub fn view(&self) -> AdapterView<'_, B> {
        AdapterView {
            rank: self.config.r,
            layers: self.layers.iter().map(|(k, p)| (*k, &p.lora)).collect(),
            blocks: vec![],
        }
    }

    /// The view of a stack of adapters uploaded as one (`stack.adapter`): batched generation
    /// gates each request's rows to its adapter of the stack (`infer::batch::Request::adapter`).
    pub fn stacked_view(
        &self,
        stack: &crate::model::lora::StackedAdapter,
    ) -> Result<AdapterView<'_, B>> {
        self.check_holds(stack)?;
        Ok(AdapterView {
            blocks: stack.blocks.clone(),
            ..self.view()
        })
    }

    /// That this is `stack.adapter` on the backend (its rank and targets), as the gates built
    /// from the stack's blocks assume.
    pub fn check_holds(&self, stack: &crate::model::lora::StackedAdapter) -> Result<()> {
        let want = &stack.adapter.config;
        if self.config.r != want.r || self.config.targets != want.targets {
            return Err(Error::Invalid(format!(
                "the adapter on the backend (rank {}) is not the stack's (rank {}): upload \
                 stack.adapter",
                self.config.r, want.r
            )));
        }
        Ok(())
    }

    /// Upload an adapter with zeroed gradients and moments.
    pub fn upload(be: &B, host: &HostAdapter) -> Result<Self> {
        Self::upload_with(be, host, true, true)
    }

    /// Upload an adapter whose gradients are measured but never applied (`rec::prune`): A, B
    /// and zeroed gradients; the moment tensors empty (an optimizer step over it fails its
    /// shape checks).
    pub fn upload_for_gradients(be: &B, host: &HostAdapter) -> Result<Self> {
        Self::upload_with(be, host, true, false)
    }

    /// Upload an adapter to apply, not train (scoring): A and B only, the gradient and moment
    /// tensors empty (an optimizer step over it fails its shape checks).
    pub fn upload_frozen(be: &B, host: &HostAdapter) -> Result<Self> {
        Self::upload_with(be, host, false, false)
    }

    fn upload_with(be: &B, host: &HostAdapter, grads: bool, moments: bool) -> Result<Self> {
        let scale = host.config.scale();
        let z = |keep: bool, rows: usize, cols: usize| {
            be.zeros(&[if keep { rows } else { 0 }, cols], DType::F32)
        };
        let mut layers = BTreeMap::new();
        for (&key, w) in &host.layers {
            let (r, k, n) = (w.r, w.in_features, w.out_features);
            layers.insert(
                key,
                DevLoraParams {
                    lora: Lora {
                        a: f32_tensor(be, [r, k], &w.a)?,
                        b: f32_tensor(be, [n, r], &w.b)?,
                        scale,
                    },
                    grad_a: z(grads, r, k)?,
                    grad_b: z(grads, n, r)?,
                    m_a: z(moments, r, k)?,
                    v_a: z(moments, r, k)?,
                    m_b: z(moments, n, r)?,
                    v_b: z(moments, n, r)?,
                },
            );
        }
        Ok(DevAdapter {
            config: host.config.clone(),
            base_model: host.base_model.clone(),
            layers,
        })
    }

    /// No adapter at all (rank 0, no target): the base model alone. A scoring workspace built
    /// for it (`Workspace::forward_only` with its rank and targets) holds no LoRA buffers.
    pub fn none() -> Self {
        Self::empty(LoraConfig {
            r: 0,
            alpha: 0.0,
            dropout: 0.0,
            targets: vec![],
        })
    }

    /// No adapted projection, keeping `config` for what is sized by it (a workspace made for
    /// an adapter of that shape, e.g. one to be swapped in).
    pub fn empty(config: LoraConfig) -> Self {
        DevAdapter {
            config,
            base_model: String::new(),
            layers: BTreeMap::new(),
        }
    }

    pub fn get(&self, layer: usize, t: Target) -> Option<&DevLoraParams<B>> {
        self.layers.get(&(layer, t))
    }

    /// The weights back on the host.
    pub fn to_host(&self, be: &B) -> Result<HostAdapter> {
        let mut layers = BTreeMap::new();
        for (&key, p) in &self.layers {
            let (r, k) = (p.lora.a.shape[0], p.lora.a.shape[1]);
            layers.insert(
                key,
                HostLora {
                    a: download_f32(be, &p.lora.a)?,
                    b: download_f32(be, &p.lora.b)?,
                    r,
                    in_features: k,
                    out_features: p.lora.b.shape[0],
                },
            );
        }
        Ok(HostAdapter {
            config: self.config.clone(),
            base_model: self.base_model.clone(),
            layers,
        })
    }

    /// Zero every gradient (start of an optimizer step).
    pub fn zero_grads(&mut self, be: &B) -> Result<()> {
        for p in self.layers.values_mut() {
            be.fill_zero(&mut p.grad_a)?;
            be.fill_zero(&mut p.grad_b)?;
        }
        Ok(())
    }

    /// Σ of squared gradients over every tensor (for global-norm clipping), summed on the
    /// device so the step waits for one download, not one per tensor.
    pub fn grad_sq_norm(&self, be: &B) -> Result<f64> {
        let mut part = be.zeros(&[1], DType::F32)?;
        let mut total = be.zeros(&[1], DType::F32)?;
        for p in self.layers.values() {
            for g in [&p.grad_a, &p.grad_b] {
                be.sum_squares(g, &mut part)?;
                be.add_assign(&mut total, &part)?;
            }
        }
        Ok(download_f32(be, &total)?[0] as f64)
    }

    /// Gradients on the host, in the adapter's order: (key, dA, dB).
    pub fn grads_to_host(&self, be: &B) -> Result<HostGrads> {
        self.layers
            .iter()
            .map(|(&k, p)| {
                Ok((
                    k,
                    download_f32(be, &p.grad_a)?,
                    download_f32(be, &p.grad_b)?,
                ))
            })
            .collect()
    }

    /// The optimizer moments on the host, (m_a, v_a, m_b, v_b) per key (checkpoints).
    pub fn moments_to_host(&self, be: &B) -> Result<Vec<[Vec<f32>; 4]>> {
        self.layers
            .values()
            .map(|p| {
                Ok([
                    download_f32(be, &p.m_a)?,
                    download_f32(be, &p.v_a)?,
                    download_f32(be, &p.m_b)?,
                    download_f32(be, &p.v_b)?,
                ])
            })
            .collect()
    }

    /// Restore optimizer moments saved by `moments_to_host` (same keys, same order).
    pub fn set_moments(&mut self, be: &B, moments: &[[Vec<f32>; 4]]) -> Result<()> {
        if moments.len() != self.layers.len() {
            return Err(Error::Invalid(format!(
                "optimizer state has {} adapted projections, the adapter {}",
                moments.len(),
                self.layers.len()
            )));
        }
        for (p, m) in self.layers.values_mut().zip(moments) {
            let sa = [p.m_a.shape[0], p.m_a.shape[1]];
            let sb = [p.m_b.shape[0], p.m_b.shape[1]];
            if m[0].len() != sa[0] * sa[1]
                || m[1].len() != sa[0] * sa[1]
                || m[2].len() != sb[0] * sb[1]
                || m[3].len() != sb[0] * sb[1]
            {
                return Err(Error::Shape(
                    "optimizer state does not match the adapter's shapes".into(),
                ));
            }
            p.m_a = f32_tensor(be, sa, &m[0])?;
            p.v_a = f32_tensor(be, sa, &m[1])?;
            p.m_b = f32_tensor(be, sb, &m[2])?;
            p.v_b = f32_tensor(be, sb, &m[3])?;
        }
        Ok(())
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> usize {
        self.layers
            .values()
            .map(|p| p.lora.a.numel() + p.lora.b.numel())
            .sum()
    }
}
