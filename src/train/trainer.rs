//! The training loop: micro-batches with gradient accumulation, the cosine schedule, clipping,
//! AdamW, and checkpoints that resume exactly.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use crate::backend::{AdamW, Backend};
use crate::error::{Error, Result};
use crate::memory::{Checkpointing, TrainSetup};
use crate::model::adapter;
use crate::model::lora::{parse_targets, HostAdapter, LoraConfig, Target};
use crate::model::{Llama, LlamaConfig};
use crate::tensor::HostTensor;

use super::data::{DataOrder, Example};
use super::optim::{cosine_lr, optimizer_step};
use super::params::DevAdapter;
use super::step::{forward_backward, Batch, LoraRun, Workspace};

/// Everything that decides what a run computes. Every field can be overridden on the command
/// line; `preset` gives the named starting points.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    pub lora: LoraConfig,
    pub lr: f32,
    pub warmup_steps: usize,
    /// Optimizer updates in the whole run (the cosine schedule ends here).
    pub steps: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer update.
    pub grad_accum: usize,
    /// Longest sequence in tokens (longer examples are truncated on the right).
    pub cutoff: usize,
    pub weight_decay: f32,
    /// Global gradient-norm clipping; 0 disables it.
    pub max_grad_norm: f32,
    pub seed: u64,
    /// Which layers recompute their activations in the backward pass instead of keeping them
    /// (all by default; the command line's `auto` lets the memory plan choose). It changes
    /// memory and speed, never a number, so a resumed run may use another policy.
    pub checkpointing: Checkpointing,
}

impl TrainConfig {
    /// What the memory plan needs to know of this run on `model` within `budget` bytes.
    pub fn memory_setup(&self, model: &LlamaConfig, budget: u64) -> TrainSetup {
        TrainSetup {
            model: model.clone(),
            batch: self.batch_size,
            seq: self.cutoff,
            lora_rank: self.lora.r,
            targets: self
                .lora
                .targets
                .iter()
                .map(|t| t.short_name().to_string())
                .collect(),
            checkpointing: self.checkpointing,
            logits_chunk: super::step::HEAD_CHUNK,
            budget,
        }
    }

    /// `itrek`: lr 1e-5, context 1024, batch 4 × accumulation 2, cosine with 50 warm-up steps,
    /// 6000 steps, r 16, alpha 16, dropout 0.05 on q, k, v, o. `tallrec`: lr 1e-4, cutoff 512,
    /// r 8, alpha 16, dropout 0.05 on q, v, 20 warm-up steps (batch 4 × accumulation 4 and 200
    /// steps are this engine's choice; TALLRec's own batch of 128 is reachable with --accum).
    pub fn preset(name: &str) -> Result<TrainConfig> {
        let base = TrainConfig {
            lora: LoraConfig {
                r: 8,
                alpha: 16.0,
                dropout: 0.05,
                targets: vec![Target::Q, Target::V],
            },
            lr: 1e-4,
            warmup_steps: 20,
            steps: 200,
            batch_size: 4,
            grad_accum: 4,
            cutoff: 512,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 42,
            checkpointing: Checkpointing::All,
        };
        match name {
            "tallrec" => Ok(base),
            "itrek" => Ok(TrainConfig {
                lora: LoraConfig {
                    r: 16,
                    alpha: 16.0,
                    dropout: 0.05,
                    targets: parse_targets("q,k,v,o")?,
                },
                lr: 1e-5,
                warmup_steps: 50,
                steps: 6000,
                batch_size: 4,
                grad_accum: 2,
                cutoff: 1024,
                ..base
            }),
            _ => Err(Error::Invalid(format!(
                "unknown preset {name:?}: expected tallrec or itrek"
            ))),
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.lora.validate()?;
        let bad = |m: &str| Err(Error::Invalid(m.to_string()));
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("the learning rate must be a positive number");
        }
        // The adapter adds (alpha / r)·B·A·x: at 0 it would train nothing, and below 0 every
        // update would be mirrored (a loaded PEFT adapter may still carry any finite alpha).
        if !(self.lora.alpha.is_finite() && self.lora.alpha > 0.0) {
            return bad("LoRA alpha must be a positive number (the adapter's scale is alpha / r)");
        }
        if self.steps == 0 || self.batch_size == 0 || self.grad_accum == 0 {
            return bad("steps, batch size and gradient accumulation must be at least 1");
        }
        if self.cutoff < 2 {
            return bad("the cutoff must be at least 2 tokens");
        }
        use crate::memory::{MAX_RANK, MAX_SEQUENCES, MAX_SEQ_TOKENS};
        for (what, v, most) in [
            ("batch size", self.batch_size, MAX_SEQUENCES),
            ("gradient accumulation", self.grad_accum, MAX_SEQUENCES),
            ("cutoff", self.cutoff, MAX_SEQ_TOKENS),
            ("LoRA rank", self.lora.r, MAX_RANK),
        ] {
            if v > most {
                return Err(Error::Invalid(format!(
                    "{what} {v} is more than recforge takes (at most {most})"
                )));
            }
        }
        // Comparisons are false for NaN, so NaN is refused too; an infinite norm never clips.
        let clip_ok = self.max_grad_norm >= 0.0;
        let decay_ok = self.weight_decay.is_finite() && self.weight_decay >= 0.0;
        if !(clip_ok && decay_ok) {
            return bad("max-grad-norm and weight decay must be numbers that are not negative");
        }
        Ok(())
    }

    fn to_json(&self) -> Value {
        json!({
            "r": self.lora.r,
            "alpha": self.lora.alpha,
            "dropout": self.lora.dropout,
            "targets": self.lora.targets.iter().map(|t| t.peft_name()).collect::<Vec<_>>(),
            "lr": self.lr,
            "warmup_steps": self.warmup_steps,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "cutoff": self.cutoff,
            "weight_decay": self.weight_decay,
            "max_grad_norm": self.max_grad_norm,
            "seed": self.seed.to_string(),
            "checkpointing": self.checkpointing.to_json(),
        })
    }

    fn from_json(v: &Value, path: &Path) -> Result<TrainConfig> {
        let bad = |k: &str| {
            Error::format(
                path,
                format!("trainer state: field {k:?} is missing or invalid"),
            )
        };
        let f = |k: &str| v.get(k).and_then(Value::as_f64).ok_or_else(|| bad(k));
        let u = |k: &str| {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| bad(k))
        };
        let targets = v
            .get("targets")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("targets"))?
            .iter()
            .map(|t| t.as_str().ok_or_else(|| bad("targets")))
            .collect::<Result<Vec<_>>>()?
            .join(",");
        let config = TrainConfig {
            lora: LoraConfig {
                r: u("r")?,
                alpha: f("alpha")? as f32,
                dropout: f("dropout")? as f32,
                targets: parse_targets(&targets)
                    .map_err(|e| Error::format(path, format!("trainer state: {e}")))?,
            },
            lr: f("lr")? as f32,
            warmup_steps: u("warmup_steps")?,
            steps: u("steps")?,
            batch_size: u("batch_size")?,
            grad_accum: u("grad_accum")?,
            cutoff: u("cutoff")?,
            weight_decay: f("weight_decay")? as f32,
            max_grad_norm: f("max_grad_norm")? as f32,
            seed: v
                .get("seed")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("seed"))?,
            checkpointing: v
                .get("checkpointing")
                .and_then(Checkpointing::from_json)
                .ok_or_else(|| bad("checkpointing"))?,
        };
        // A value no run could have saved (an edited or damaged file) is the file's fault.
        config
            .validate()
            .map_err(|e| Error::format(path, format!("trainer state: {e}")))?;
        Ok(config)
    }
}

/// The `format` of a checkpoint's trainer_state.json.
const STATE_FORMAT: &str = "recforge-trainer-state";

/// A hidden name next to `dir` for a checkpoint being written or replaced.
fn sibling(dir: &Path, what: &str) -> std::path::PathBuf {
    crate::model::convert::hidden_beside(dir, what)
}

/// A complete checkpoint that an interrupted save left beside `dir` under one of the hidden
/// names of [`sibling`] (the previous one moved aside, or the new one not yet renamed): the
/// newest, if there are several.
fn saved_beside(dir: &Path) -> Option<std::path::PathBuf> {
    siblings(dir)
        .into_iter()
        .filter_map(|(path, _)| {
            let t = std::fs::metadata(path.join("trainer_state.json")).ok()?;
            Some((t.modified().ok()?, path))
        })
        .max()
        .map(|(_, p)| p)
}

/// The hidden folders of [`sibling`] beside `dir`, each with the process id its name ends in
/// (`None` where that is not a number).
fn siblings(dir: &Path) -> Vec<(std::path::PathBuf, Option<u32>)> {
    crate::model::convert::all_hidden_beside(dir, &SIBLING_KINDS)
}

const SIBLING_KINDS: [&str; 2] = ["old", "tmp"];

/// Removes the hidden folders ([`sibling`]) that saves of `dir` by processes no longer running
/// left behind (killed mid-save): called once `dir` holds a newer complete checkpoint, which
/// supersedes them.
fn remove_stale_siblings(dir: &Path) {
    crate::model::convert::remove_stale_beside(dir, &SIBLING_KINDS)
}

/// A checkpoint's `trainer_state.json`, read and its config validated: what `--resume` can
/// check before a model loads. Returns the file's path, its JSON and its config.
fn read_state(dir: &Path) -> Result<(PathBuf, Value, TrainConfig)> {
    let sp = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&sp).map_err(|e| match saved_beside(dir) {
        // A save killed between its two renames leaves the checkpoint under a hidden name.
        Some(other) if !dir.exists() => Error::Invalid(format!(
            "{}: no checkpoint there, but a save of it was interrupted and left a complete \
             one in {}: rename that to {} to resume from it",
            dir.display(),
            other.display(),
            dir.display()
        )),
        _ => Error::io(&sp, e),
    })?;
    let state: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&sp, format!("not valid JSON: {e}")))?;
    if state.get("format").and_then(Value::as_str) != Some(STATE_FORMAT) {
        return Err(Error::format(&sp, "not a recforge trainer state"));
    }
    let config = TrainConfig::from_json(
        state
            .get("config")
            .ok_or_else(|| Error::format(&sp, "no config"))?,
        &sp,
    )?;
    Ok((sp, state, config))
}

/// Whether `dir` holds a checkpoint `Trainer::resume` can start from, as far as its trainer
/// state tells without the model and the data: run before a model loads, so a wrong
/// `--resume` path fails at once. Returns the checkpoint's config and the updates it has done.
pub fn check_resume_dir(dir: &Path) -> Result<(TrainConfig, usize)> {
    let (sp, state, config) = read_state(dir)?;
    Ok((config, state_step(&state, &sp)?))
}

fn state_step(state: &Value, sp: &Path) -> Result<usize> {
    state
        .get("step")
        .and_then(Value::as_u64)
        .map(|s| s as usize)
        .ok_or_else(|| Error::format(sp, "no step count"))
}

/// A checkpoint folder replaces what is at `dir`, so `dir` must be absent, an empty folder, or
/// an earlier checkpoint (it holds a recforge trainer state): a mistyped path to a folder of
/// other files is refused, never deleted; an absent `dir` must be one the save can create (not
/// below a file, in a folder that takes files). Call it before training to fail at once.
pub fn check_checkpoint_dir(dir: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return crate::model::convert::check_output(dir, crate::model::convert::Output::Folder);
    };
    let refuse = |why: &str| {
        Err(Error::Invalid(format!(
            "{}: {why}; a checkpoint replaces its folder, so give a new path, an empty \
             folder or an earlier checkpoint",
            dir.display()
        )))
    };
    if !meta.is_dir() {
        return refuse("exists and is not a folder");
    }
    let mut names = vec![];
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        names.push(e.map_err(|e| Error::io(dir, e))?.file_name());
    }
    if names.is_empty() {
        return Ok(());
    }
    let state = std::fs::read_to_string(dir.join("trainer_state.json")).unwrap_or_default();
    let is_checkpoint = serde_json::from_str::<Value>(&state)
        .is_ok_and(|v| v.get("format").and_then(Value::as_str) == Some(STATE_FORMAT));
    if !is_checkpoint {
        return refuse("holds files and is not a recforge checkpoint");
    }
    // A checkpoint with something else put in it (an adapter saved there, notes) would lose
    // it at the next save.
    match names
        .iter()
        .find(|n| !CHECKPOINT_FILES.iter().any(|f| n.as_os_str() == *f))
    {
        None => Ok(()),
        Some(other) => refuse(&format!(
            "is a checkpoint but also holds {:?}, which the next save would delete",
            other
        )),
    }
}

/// What a checkpoint folder holds: the adapter in PEFT's format, the AdamW moments and the
/// trainer state.
const CHECKPOINT_FILES: [&str; 4] = [
    adapter::CONFIG_FILE,
    adapter::WEIGHTS_FILE,
    "optimizer.safetensors",
    "trainer_state.json",
];

/// What one optimizer update did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRecord {
    /// Updates done so far (1 after the first).
    pub step: usize,
    /// Mean loss per labelled token over the update's micro-batches.
    pub loss: f64,
    pub lr: f32,
    pub grad_norm: f64,
    /// Tokens run through the model (labelled or not).
    pub tokens: usize,
    pub label_tokens: usize,
    /// The forward pass, including the output head's loss and its backward (they run chunk by
    /// chunk together); `backward_secs` is the layers' backward with recomputation.
    pub forward_secs: f64,
    pub backward_secs: f64,
    pub optimizer_secs: f64,
    pub memory_in_use: Option<u64>,
}

impl StepRecord {
    pub fn secs(&self) -> f64 {
        self.forward_secs + self.backward_secs + self.optimizer_secs
    }
}

/// A fingerprint of the training data, so a resume with other data is refused.
fn fingerprint(data: &[Example]) -> String {
    let mut h = crate::hash::Fnv1a::default();
    for e in data {
        for &x in e
            .ids
            .iter()
            .chain(&e.labels)
            .chain(std::iter::once(&u32::MAX))
        {
            h.mix(x as u64);
        }
    }
    format!("{}-{}", h.hex(), data.len())
}

pub struct Trainer<'a, B: Backend> {
    be: &'a B,
    model: &'a Llama<B>,
    pub adapter: DevAdapter<B>,
    pub config: TrainConfig,
    data: Vec<Example>,
    order: DataOrder,
    /// Optimizer updates done.
    pub step: usize,
    ws: Option<Workspace<B>>,
    pub history: Vec<StepRecord>,
}

fn micro_seed(seed: u64, micro: usize) -> u64 {
    let mut r = crate::rng::Rng::new(seed ^ (micro as u64).wrapping_mul(0x9FB2_1C65_1E98_DF25));
    r.next_u64()
}

impl<'a, B: Backend> Trainer<'a, B> {
    /// A new run: a PEFT-initialised adapter from the config's seed.
    pub fn new(
        be: &'a B,
        model: &'a Llama<B>,
        config: TrainConfig,
        data: Vec<Example>,
        base_model: &str,
    ) -> Result<Self> {
        config.validate()?;
        let host = HostAdapter::init(&model.config, &config.lora, config.seed, base_model)?;
        Self::with_adapter(be, model, config, data, &host)
    }

    /// A run starting from the given adapter weights (fresh optimizer state).
    pub fn with_adapter(
        be: &'a B,
        model: &'a Llama<B>,
        config: TrainConfig,
        data: Vec<Example>,
        host: &HostAdapter,
    ) -> Result<Self> {
        config.validate()?;
        host.check_against(&model.config)?;
        config
            .checkpointing
            .check(model.config.num_hidden_layers)
            .map_err(Error::Invalid)?;
        if let Some(e) = data.iter().find(|e| e.ids.len() > config.cutoff) {
            return Err(Error::Invalid(format!(
                "an example has {} tokens, more than the cutoff of {}",
                e.ids.len(),
                config.cutoff
            )));
        }
        let order = DataOrder::new(data.len(), config.seed)?;
        Ok(Trainer {
            be,
            model,
            adapter: DevAdapter::upload(be, host)?,
            config,
            data,
            order,
            step: 0,
            ws: None,
            history: vec![],
        })
    }

    /// Change which layers recompute (before or between updates; the numbers do not change).
    pub fn set_checkpointing(&mut self, cp: Checkpointing) -> Result<()> {
        cp.check(self.model.config.num_hidden_layers)
            .map_err(Error::Invalid)?;
        if cp != self.config.checkpointing {
            self.config.checkpointing = cp;
            self.ws = None;
        }
        Ok(())
    }

    pub fn done(&self) -> bool {
        self.step >= self.config.steps
    }

    fn micro_batch(&mut self, micro: usize) -> Result<Batch> {
        let bs = self.config.batch_size;
        let idx: Vec<usize> = (micro * bs..(micro + 1) * bs)
            .map(|i| self.order.at(i))
            .collect();
        Batch::pack(
            idx.iter()
                .map(|&i| (&self.data[i].ids[..], &self.data[i].labels[..])),
        )
    }

    /// One optimizer update.
    pub fn step(&mut self) -> Result<StepRecord> {
        let (be, cfg) = (self.be, self.config.clone());
        let first_micro = self.step * cfg.grad_accum;
        let batches = (first_micro..first_micro + cfg.grad_accum)
            .map(|m| self.micro_batch(m))
            .collect::<Result<Vec<_>>>()?;
        let label_tokens: usize = batches.iter().map(Batch::label_count).sum();
        let tokens: usize = batches.iter().map(Batch::len).sum();
        if label_tokens == 0 {
            return Err(Error::Invalid(
                "an optimizer step with no labelled tokens (every response was truncated?)".into(),
            ));
        }
        // The loss is the mean over every labelled token of the update (as transformers does
        // for accumulated micro-batches), so the gradient scale is 1 / labelled tokens.
        let grad_scale = 1.0 / label_tokens as f32;
        self.adapter.zero_grads(be)?;
        let (mut fwd, mut bwd, mut loss_sum) = (0.0, 0.0, 0.0);
        for (j, batch) in batches.iter().enumerate() {
            let t = batch.len();
            if self.ws.as_ref().map(Workspace::tokens) != Some(t) {
                self.ws = None; // free the old one first
                self.ws = Some(Workspace::new(
                    be,
                    self.model,
                    &cfg.lora.targets,
                    cfg.lora.r,
                    t,
                    cfg.checkpointing
                        .recomputed(self.model.config.num_hidden_layers),
                )?);
            }
            let ws = self.ws.as_mut().expect("workspace was just made");
            let run = LoraRun {
                dropout: cfg.lora.dropout,
                micro_seed: micro_seed(cfg.seed, first_micro + j),
            };
            let out = forward_backward(
                be,
                self.model,
                &mut self.adapter,
                ws,
                batch,
                run,
                grad_scale,
            )?;
            fwd += out.forward_secs;
            bwd += out.backward_secs;
            loss_sum += out.loss_sum;
        }
        let t0 = Instant::now();
        let lr = cosine_lr(cfg.lr, self.step, cfg.warmup_steps, cfg.steps);
        let hp = AdamW {
            lr,
            weight_decay: cfg.weight_decay,
            ..AdamW::default()
        };
        let clip = optimizer_step(
            be,
            &mut self.adapter,
            hp,
            self.step as u32 + 1,
            cfg.max_grad_norm,
        )?;
        be.synchronize()?;
        // A finite loss over a gradient of exactly 0 is not a minimum: activations that
        // overflowed f32 (RMSNorm of a row whose squares sum to infinity is all zeros) carry no
        // gradient, and every later update would be the same. Stop as for a non-finite loss.
        let loss = loss_sum / label_tokens as f64;
        if !clip.grad_norm.is_finite() || (clip.grad_norm == 0.0 && loss > 0.0) {
            return Err(Error::Invalid(format!(
                "update {}: the LoRA gradient norm is {} at loss {loss:.4}: the training \
                 diverged (activations overflowed; lr {lr:.2e})",
                self.step + 1,
                clip.grad_norm
            )));
        }
        self.step += 1;
        let rec = StepRecord {
            step: self.step,
            loss,
            lr,
            grad_norm: clip.grad_norm,
            tokens,
            label_tokens,
            forward_secs: fwd,
            backward_secs: bwd,
            optimizer_secs: t0.elapsed().as_secs_f64(),
            memory_in_use: be.memory_in_use(),
        };
        self.history.push(rec.clone());
        Ok(rec)
    }

    /// The adapter's weights on the host.
    pub fn host_adapter(&self) -> Result<HostAdapter> {
        self.adapter.to_host(self.be)
    }

    /// Write a checkpoint folder: the adapter in PEFT's format, the optimizer moments, and the
    /// trainer state (config, updates done, data fingerprint, loss history). The folder is
    /// assembled under a temporary name and renamed over any previous checkpoint.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let host = self.host_adapter()?;
        let moments = self.adapter.moments_to_host(self.be)?;
        let tmp = sibling(dir, "tmp");
        let res = (|| -> Result<()> {
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
            }
            std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
            adapter::save(&host, &tmp)?;
            let mut tensors = vec![];
            for ((l, t), m) in host.layers.keys().zip(&moments) {
                let w = &host.layers[&(*l, *t)];
                let shapes = [
                    ("m_a", vec![w.r, w.in_features]),
                    ("v_a", vec![w.r, w.in_features]),
                    ("m_b", vec![w.out_features, w.r]),
                    ("v_b", vec![w.out_features, w.r]),
                ];
                for ((name, shape), v) in shapes.into_iter().zip(m) {
                    tensors.push((
                        format!("layers.{l}.{}.{name}", t.module_path()),
                        HostTensor::f32(shape, v.clone())?,
                    ));
                }
            }
            let refs: Vec<(String, &HostTensor)> =
                tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
            let p = tmp.join("optimizer.safetensors");
            std::fs::write(&p, crate::model::convert::safetensors_bytes(&refs))
                .map_err(|e| Error::io(&p, e))?;
            let state = json!({
                "format": STATE_FORMAT,
                "version": 1,
                "step": self.step,
                "config": self.config.to_json(),
                "data": fingerprint(&self.data),
                "history": self.history.iter().map(|r| json!({"step": r.step, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm})).collect::<Vec<_>>(),
            });
            let p = tmp.join("trainer_state.json");
            std::fs::write(&p, serde_json::to_string_pretty(&state).unwrap_or_default())
                .map_err(|e| Error::io(&p, e))?;
            // Refused here, a folder that is not a checkpoint is left as it was (and the new
            // one removed with the rest of `tmp` below).
            check_checkpoint_dir(dir)?;
            if !dir.exists() {
                return std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e));
            }
            // The previous checkpoint is moved aside, not deleted, until the new one has its
            // name: at every moment one complete checkpoint is on disk.
            let old = sibling(dir, "old");
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
            }
            std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
            if let Err(e) = std::fs::rename(&tmp, dir) {
                let _ = std::fs::rename(&old, dir);
                return Err(Error::io(dir, e));
            }
            let _ = std::fs::remove_dir_all(&old);
            Ok(())
        })();
        match &res {
            Ok(()) => remove_stale_siblings(dir),
            Err(_) => {
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
        res
    }

    /// Continue a run from a checkpoint folder written by `save_checkpoint`, with the same data.
    /// `steps`, when given, replaces the total number of updates (to extend a run).
    pub fn resume(
        be: &'a B,
        model: &'a Llama<B>,
        dir: &Path,
        data: Vec<Example>,
        steps: Option<usize>,
    ) -> Result<Self> {
        let (sp, state, mut config) = read_state(dir)?;
        if let Some(s) = steps {
            config.steps = s;
        }
        let step = state_step(&state, &sp)?;
        if config.steps < step {
            return Err(Error::Invalid(format!(
                "{}: the checkpoint has done {step} updates already, more than the {} asked for",
                dir.display(),
                config.steps
            )));
        }
        let want = state
            .get("data")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if want != fingerprint(&data) {
            return Err(Error::Invalid(format!(
                "{}: the checkpoint was trained on other data (fingerprint {want}, these examples \
                 give {}); resume with the same training file and settings",
                dir.display(),
                fingerprint(&data)
            )));
        }
        let in_state = |e: String| Error::format(&sp, format!("trainer state: {e}"));
        config
            .checkpointing
            .check(model.config.num_hidden_layers)
            .map_err(in_state)?;
        if let Some(e) = data.iter().find(|e| e.ids.len() > config.cutoff) {
            return Err(in_state(format!(
                "its cutoff of {} tokens is shorter than an example of the data it was trained \
                 on ({} tokens)",
                config.cutoff,
                e.ids.len()
            )));
        }
        let host = adapter::load(dir)?;
        if host.config.r != config.lora.r || host.config.targets != config.lora.targets {
            return Err(Error::format(
                &sp,
                "the adapter's rank or targets differ from the trainer state",
            ));
        }
        let mut t = Self::with_adapter(be, model, config, data, &host)?;
        let op = dir.join("optimizer.safetensors");
        let bytes = std::fs::read(&op).map_err(|e| Error::io(&op, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::format(&op, format!("not a valid safetensors file: {e}")))?;
        let mut moments = vec![];
        for (l, tg) in host.layers.keys() {
            let mut m: [Vec<f32>; 4] = Default::default();
            for (slot, name) in m.iter_mut().zip(["m_a", "v_a", "m_b", "v_b"]) {
                let key = format!("layers.{l}.{}.{name}", tg.module_path());
                let view = st
                    .tensor(&key)
                    .map_err(|_| Error::format(&op, format!("tensor {key} is missing")))?;
                if view.dtype() != safetensors::Dtype::F32 {
                    return Err(Error::format(&op, format!("tensor {key} is not f32")));
                }
                *slot = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
            }
            moments.push(m);
        }
        t.adapter.set_moments(be, &moments)?;
        t.step = step;
        if let Some(h) = state.get("history").and_then(Value::as_array) {
            for r in h {
                let g = |k: &str| r.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
                t.history.push(StepRecord {
                    step: g("step") as usize,
                    loss: g("loss"),
                    lr: g("lr") as f32,
                    grad_norm: g("grad_norm"),
                    tokens: 0,
                    label_tokens: 0,
                    forward_secs: 0.0,
                    backward_secs: 0.0,
                    optimizer_secs: 0.0,
                    memory_in_use: None,
                });
            }
        }
        Ok(t)
    }
}
