//! PEFT adapter files (adapter_config.json + adapter_model.safetensors) and merging.
//!
//! The files are exactly what Hugging Face PEFT writes and reads for a LoRA adapter on a LLaMA
//! causal LM: tensors named `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight`
//! (A `[r, in]`) and `...lora_B.weight` (B `[out, r]`), f32, and a config with `peft_type`
//! `LORA`. Both files are written under temporary names and renamed into place, so an
//! interrupted save never leaves a half-written file. Loading accepts what PEFT itself may
//! have written (f16 / bf16 tensors, `r` as a float, unknown config fields, the older
//! `lora_A.default.weight` names) and refuses, with the file and the reason, the LoRA variants
//! this engine does not implement (DoRA, rsLoRA, per-module ranks, trained biases, ...).
//!
//! `merge` folds an adapter into a base model, W + (alpha / r) · B·A, and writes an HF folder.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{json, Value};

use super::lora::{HostAdapter, HostLora, LoraConfig, Target};
use super::source::ModelSource;
use crate::error::{Error, Result};
use crate::tensor::{DType, HostData, HostTensor};

/// The adapter's configuration file inside an adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's weights inside an adapter folder.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's legacy pickle weights, recognised only to refuse them clearly.
pub const BIN_WEIGHTS_FILE: &str = "adapter_model.bin";

/// Prefix of every LoRA tensor name of a PEFT causal-LM LLaMA adapter.
const PREFIX: &str = "base_model.model.model.layers.";

/// PEFT's names of the A and B tensors of one adapted projection, e.g.
/// `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
pub fn tensor_names(layer: usize, target: Target) -> (String, String) {
    let stem = format!("{PREFIX}{layer}.{}", target.module_path());
    (
        format!("{stem}.lora_A.weight"),
        format!("{stem}.lora_B.weight"),
    )
}

/// Which half of a LoRA pair a tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Half {
    A,
    B,
}

/// Parse a PEFT LoRA tensor name (the standard `lora_A.weight` form and the older
/// `lora_A.default.weight` one) into (layer, target, half).
fn parse_tensor_name(name: &str) -> Option<(usize, Target, Half)> {
    let rest = name.strip_prefix(PREFIX)?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    for t in Target::ALL {
        let Some(tail) = rest
            .strip_prefix(t.module_path().as_str())
            .and_then(|s| s.strip_prefix('.'))
        else {
            continue;
        };
        let half = match tail {
            "lora_A.weight" | "lora_A.default.weight" => Half::A,
            "lora_B.weight" | "lora_B.default.weight" => Half::B,
            _ => return None,
        };
        return Some((layer, t, half));
    }
    None
}

// ----------------------------------------------------------------------------------------------
// Saving

/// A float as JSON the way PEFT writes it: an integer when it is one, otherwise the shortest
/// decimal that reads back as the same f32.
fn json_number(x: f32) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json_float(x)
    }
}

/// A float as JSON, always with a fraction or exponent (`0.0`, `0.05`), reading back as the
/// same f32.
fn json_float(x: f32) -> Value {
    let d: f64 = format!("{x}").parse().unwrap_or(x as f64);
    json!(d)
}

/// The `adapter_config.json` contents for `adapter` (PEFT's LoraConfig fields).
pub fn config_json(adapter: &HostAdapter) -> Value {
    let c = &adapter.config;
    let mut targets: Vec<&str> = c.targets.iter().map(|t| t.peft_name()).collect();
    targets.sort_unstable();
    targets.dedup();
    let base = if adapter.base_model.is_empty() {
        Value::Null
    } else {
        Value::String(adapter.base_model.clone())
    };
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": c.r,
        "lora_alpha": json_number(c.alpha),
        "lora_dropout": json_float(c.dropout),
        "target_modules": targets,
        "bias": "none",
        "base_model_name_or_path": base,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "modules_to_save": Value::Null,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": Value::Null,
        "layers_pattern": Value::Null,
        "revision": Value::Null,
    })
}

/// Checks that every (layer, target) holds A `[r, in]` and B `[out, r]` with the config's rank,
/// non-empty and finite. `what` prefixes messages ("cannot save adapter", ...).
fn check_weights(adapter: &HostAdapter, what: &str) -> Result<()> {
    adapter
        .config
        .validate()
        .map_err(|e| Error::Invalid(format!("{what}: {e}")))?;
    for (&(l, t), w) in &adapter.layers {
        let (an, bn) = tensor_names(l, t);
        if !adapter.config.targets.contains(&t) {
            return Err(Error::Invalid(format!(
                "{what}: tensor '{an}' adapts {t}, which is not among the config's target \
                 modules {:?}",
                adapter
                    .config
                    .targets
                    .iter()
                    .map(|t| t.peft_name())
                    .collect::<Vec<_>>()
            )));
        }
        if w.r == 0 || w.in_features == 0 || w.out_features == 0 || w.a.is_empty() {
            return Err(Error::Invalid(format!(
                "{what}: tensor '{an}' is empty (r = {}, {} → {} features)",
                w.r, w.in_features, w.out_features
            )));
        }
        if w.r != adapter.config.r {
            return Err(Error::Shape(format!(
                "{what}: layer {l} {t} has rank {} but the config says r = {}",
                w.r, adapter.config.r
            )));
        }
        if w.a.len() != w.r * w.in_features {
            return Err(Error::Shape(format!(
                "{what}: tensor '{an}' has {} values, expected r × in = {} × {}",
                w.a.len(),
                w.r,
                w.in_features
            )));
        }
        if w.b.len() != w.out_features * w.r {
            return Err(Error::Shape(format!(
                "{what}: tensor '{bn}' has {} values, expected out × r = {} × {}",
                w.b.len(),
                w.out_features,
                w.r
            )));
        }
        for (name, v) in [(&an, &w.a), (&bn, &w.b)] {
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(Error::Invalid(format!(
                    "{what}: tensor '{name}' holds a non-finite value ({}) at index {i}",
                    v[i]
                )));
            }
        }
    }
    Ok(())
}

fn tmp_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.tmp-{}", std::process::id()))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    (|| {
        let mut f = std::fs::File::create(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    })()
    .map_err(|e| Error::io(path, e))
}

/// Write `adapter` into the folder `dir` (created if missing) as PEFT's
/// `adapter_config.json` + `adapter_model.safetensors` (f32 tensors), replacing any adapter
/// already there. Both files are fully written under temporary names before either is renamed
/// into place. Refuses an adapter with no layers, empty tensors, non-finite values, or shapes
/// that disagree with its rank.
pub fn save(adapter: &HostAdapter, dir: &Path) -> Result<()> {
    if adapter.layers.is_empty() {
        return Err(Error::Invalid(format!(
            "cannot save adapter to {}: it has no LoRA layers",
            dir.display()
        )));
    }
    check_weights(adapter, "cannot save adapter")?;
    let mut owned: Vec<(String, HostTensor)> = Vec::with_capacity(2 * adapter.layers.len());
    for (&(l, t), w) in &adapter.layers {
        let (an, bn) = tensor_names(l, t);
        owned.push((an, HostTensor::f32(vec![w.r, w.in_features], w.a.clone())?));
        owned.push((bn, HostTensor::f32(vec![w.out_features, w.r], w.b.clone())?));
    }
    let refs: Vec<(String, &HostTensor)> = owned.iter().map(|(n, t)| (n.clone(), t)).collect();
    let weights = super::convert::safetensors_bytes(&refs);
    drop(refs);
    drop(owned);
    let config = serde_json::to_string_pretty(&config_json(adapter))
        .map_err(|e| Error::Invalid(format!("cannot serialize adapter config: {e}")))?;

    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let (wt, ct) = (tmp_in(dir, WEIGHTS_FILE), tmp_in(dir, CONFIG_FILE));
    let res = (|| -> Result<()> {
        write_synced(&wt, &weights)?;
        write_synced(&ct, config.as_bytes())?;
        let wp = dir.join(WEIGHTS_FILE);
        std::fs::rename(&wt, &wp).map_err(|e| Error::io(&wp, e))?;
        let cp = dir.join(CONFIG_FILE);
        std::fs::rename(&ct, &cp).map_err(|e| Error::io(&cp, e))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&wt);
        let _ = std::fs::remove_file(&ct);
    }
    res
}

// ----------------------------------------------------------------------------------------------
// Loading

/// What `adapter_config.json` says, before the weights are read.
struct ParsedConfig {
    r: usize,
    alpha: f32,
    dropout: f32,
    /// `None`: a regex `target_modules`; the targets are whatever the tensors adapt.
    targets: Option<Vec<Target>>,
    base_model: String,
    /// PEFT's `layers_to_transform` (a layer index or a list): None when absent or null.
    layers: Option<Vec<usize>>,
}

fn module_to_target(path: &Path, m: &str) -> Result<Target> {
    // PEFT matches list entries as module-name suffixes: "q_proj" or "self_attn.q_proj".
    let last = m.rsplit('.').next().unwrap_or(m);
    last.parse::<Target>().map_err(|_| {
        Error::unsupported(
            path,
            format!(
                "target module {m:?}: only LoRA on the q/k/v/o/gate/up/down projections is \
                 supported"
            ),
        )
    })
}

fn parse_config(path: &Path, text: &str) -> Result<ParsedConfig> {
    let j: Value = serde_json::from_str(text)
        .map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
    let o = j
        .as_object()
        .ok_or_else(|| Error::format(path, "expected a JSON object"))?;
    let get = |k: &str| o.get(k).filter(|v| !v.is_null());
    let is_true = |k: &str| get(k).and_then(Value::as_bool) == Some(true);

    match get("peft_type") {
        Some(Value::String(s)) if s.eq_ignore_ascii_case("LORA") => {}
        Some(Value::String(s)) => {
            return Err(Error::unsupported(
                path,
                format!("peft_type {s:?}: only LORA adapters are supported"),
            ))
        }
        Some(_) => return Err(Error::format(path, "'peft_type' must be a string")),
        None => {
            return Err(Error::format(
                path,
                "no 'peft_type' (expected \"LORA\"): is this a PEFT adapter config?",
            ))
        }
    }

    // PEFT's defaults for absent fields: r = 8, lora_alpha = 8, lora_dropout = 0.
    let r = match get("r") {
        None => 8,
        Some(v) => match (v.as_u64(), v.as_f64()) {
            (Some(n), _) => n as usize,
            (None, Some(x)) if x.fract() == 0.0 && (1.0..1e9).contains(&x) => x as usize,
            _ => {
                return Err(Error::format(
                    path,
                    format!("'r' must be a positive integer, found {v}"),
                ))
            }
        },
    };
    if r == 0 {
        return Err(Error::format(path, "'r' must be at least 1, found 0"));
    }
    let num = |k: &str, default: f32| -> Result<f32> {
        match get(k) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .map(|x| x as f32)
                .filter(|x| x.is_finite())
                .ok_or_else(|| {
                    Error::format(path, format!("'{k}' must be a finite number, found {v}"))
                }),
        }
    };
    let alpha = num("lora_alpha", 8.0)?;
    let dropout = num("lora_dropout", 0.0)?;
    if !(0.0..1.0).contains(&dropout) {
        return Err(Error::format(
            path,
            format!("'lora_dropout' {dropout} must be in [0, 1)"),
        ));
    }

    let targets = match get("target_modules") {
        None => {
            return Err(Error::format(
                path,
                "no 'target_modules': cannot tell which projections the adapter targets",
            ))
        }
        Some(Value::String(s)) if s == "all-linear" => Some(Target::ALL.to_vec()),
        Some(Value::String(s)) => match s.parse::<Target>() {
            Ok(t) => Some(vec![t]),
            // PEFT treats a single string as a regex over module names; the tensors then say
            // which projections are adapted.
            Err(_) => None,
        },
        Some(Value::Array(a)) => {
            let mut t = a
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| {
                            Error::format(
                                path,
                                format!("'target_modules' entries must be strings, found {v}"),
                            )
                        })
                        .and_then(|s| module_to_target(path, s))
                })
                .collect::<Result<Vec<_>>>()?;
            t.sort();
            t.dedup();
            if t.is_empty() {
                return Err(Error::format(path, "'target_modules' is empty"));
            }
            Some(t)
        }
        Some(v) => {
            return Err(Error::format(
                path,
                format!("'target_modules' must be a list of module names, found {v}"),
            ))
        }
    };

    match get("bias") {
        None => {}
        Some(Value::String(s)) if s == "none" => {}
        Some(v) => {
            return Err(Error::unsupported(
                path,
                format!("bias {v}: only adapters with bias \"none\" are supported"),
            ))
        }
    }
    if is_true("use_dora") {
        return Err(Error::unsupported(path, "DoRA adapters (use_dora: true)"));
    }
    if is_true("use_rslora") {
        return Err(Error::unsupported(
            path,
            "rank-stabilized LoRA (use_rslora: true, scaling alpha / sqrt(r))",
        ));
    }
    if is_true("fan_in_fan_out") {
        return Err(Error::unsupported(
            path,
            "fan_in_fan_out: true (transposed Conv1D weights; LLaMA uses Linear)",
        ));
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        match get(k) {
            None => {}
            Some(Value::Object(m)) if m.is_empty() => {}
            Some(v) => {
                return Err(Error::unsupported(
                    path,
                    format!("per-module '{k}' {v}: one rank and alpha for all modules only"),
                ))
            }
        }
    }
    match get("modules_to_save") {
        None => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(v) => {
            return Err(Error::unsupported(
                path,
                format!("modules_to_save {v}: adapters that also train full modules"),
            ))
        }
    }
    let base_model = match get("base_model_name_or_path") {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => {
            return Err(Error::format(
                path,
                format!("'base_model_name_or_path' must be a string, found {v}"),
            ))
        }
    };
    let index = |v: &Value| v.as_u64().map(|x| x as usize);
    let layers = match get("layers_to_transform") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Number(_)) => Some(vec![index(v).ok_or_else(|| {
            Error::format(
                path,
                format!("'layers_to_transform' {v} is not a layer index"),
            )
        })?]),
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| {
                    index(v).ok_or_else(|| {
                        Error::format(path, format!("'layers_to_transform' holds {v}"))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        ),
        Some(v) => {
            return Err(Error::format(
                path,
                format!("'layers_to_transform' must be a layer index or a list, found {v}"),
            ))
        }
    };
    Ok(ParsedConfig {
        r,
        alpha,
        dropout,
        targets,
        base_model,
        layers,
    })
}

fn tensor_f32(path: &Path, name: &str, view: &safetensors::tensor::TensorView) -> Result<Vec<f32>> {
    let dtype = match view.dtype() {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        other => {
            return Err(Error::unsupported(
                path,
                format!("tensor '{name}' has dtype {other:?} (supported: F32, F16, BF16)"),
            ))
        }
    };
    let v = HostData::from_le_bytes(dtype, view.data())
        .and_then(|d| d.to_f32())
        .map_err(|e| Error::format(path, format!("tensor '{name}': {e}")))?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::format(
            path,
            format!(
                "tensor '{name}' holds a non-finite value ({}) at index {i}",
                v[i]
            ),
        ));
    }
    Ok(v)
}

/// Read a PEFT LoRA adapter from the folder `dir` (a path to one of its two files is also
/// accepted). Tensors stored as f16 or bf16 are widened to f32; features are inferred from
/// the shapes. Refuses `.bin`-only adapters, corrupt or truncated files, tensor names that are
/// not LoRA A/B weights of a LLaMA projection, unpaired or mis-shaped A/B, and LoRA variants
/// this engine does not implement.
pub fn load(dir: &Path) -> Result<HostAdapter> {
    let dir = if dir.is_file() {
        let name = dir.file_name().and_then(|n| n.to_str());
        if ![CONFIG_FILE, WEIGHTS_FILE, BIN_WEIGHTS_FILE].contains(&name.unwrap_or("")) {
            return Err(Error::Invalid(format!(
                "{}: a file, not a PEFT adapter: give the adapter's folder (with \
                 {CONFIG_FILE} and {WEIGHTS_FILE}) or one of those two files",
                dir.display()
            )));
        }
        match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    } else {
        dir
    };
    let cpath = dir.join(CONFIG_FILE);
    let wpath = dir.join(WEIGHTS_FILE);
    let text = std::fs::read_to_string(&cpath).map_err(|e| Error::io(&cpath, e))?;
    let cfg = parse_config(&cpath, &text)?;
    if !wpath.exists() && dir.join(BIN_WEIGHTS_FILE).exists() {
        return Err(Error::unsupported(
            dir.join(BIN_WEIGHTS_FILE),
            "PyTorch .bin adapters are not supported; convert to safetensors \
             (adapter_model.safetensors)",
        ));
    }
    let bytes = std::fs::read(&wpath).map_err(|e| Error::io(&wpath, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        Error::format(
            &wpath,
            format!("invalid or truncated safetensors file: {e}"),
        )
    })?;

    type Entry = (String, Vec<usize>, Vec<f32>);
    let mut a: BTreeMap<(usize, Target), Entry> = BTreeMap::new();
    let mut b: BTreeMap<(usize, Target), Entry> = BTreeMap::new();
    let mut names: Vec<&str> = st.names();
    names.sort_unstable();
    for name in names {
        let Some((l, t, half)) = parse_tensor_name(name) else {
            return Err(Error::format(
                &wpath,
                format!(
                    "unknown tensor '{name}': expected LoRA weights named \
                     base_model.model.model.layers.{{i}}.{{self_attn|mlp}}.{{proj}}.lora_A.weight \
                     or .lora_B.weight"
                ),
            ));
        };
        let view = st
            .tensor(name)
            .map_err(|e| Error::format(&wpath, format!("tensor '{name}': {e}")))?;
        let shape = view.shape().to_vec();
        let v = tensor_f32(&wpath, name, &view)?;
        let map = if half == Half::A { &mut a } else { &mut b };
        if let Some((prev, _, _)) = map.insert((l, t), (name.to_string(), shape, v)) {
            return Err(Error::format(
                &wpath,
                format!("tensors '{prev}' and '{name}' hold the same LoRA weight"),
            ));
        }
    }
    if a.is_empty() && b.is_empty() {
        return Err(Error::format(&wpath, "the adapter holds no LoRA tensors"));
    }
    for (key, (name, _, _)) in &b {
        if !a.contains_key(key) {
            return Err(Error::format(
                &wpath,
                format!("tensor '{name}' has no matching lora_A tensor"),
            ));
        }
    }

    let r = cfg.r;
    let mut layers = BTreeMap::new();
    for (key, (an, ashape, av)) in a {
        let Some((bn, bshape, bv)) = b.remove(&key) else {
            return Err(Error::format(
                &wpath,
                format!("tensor '{an}' has no matching lora_B tensor"),
            ));
        };
        if ashape.len() != 2 || ashape[0] != r || ashape[1] == 0 || av.len() != r * ashape[1] {
            return Err(Error::format(
                &wpath,
                format!(
                    "tensor '{an}' has shape {ashape:?}, expected [r, in_features] with r = {r} \
                     from {CONFIG_FILE}"
                ),
            ));
        }
        if bshape.len() != 2 || bshape[1] != r || bshape[0] == 0 || bv.len() != bshape[0] * r {
            return Err(Error::format(
                &wpath,
                format!(
                    "tensor '{bn}' has shape {bshape:?}, expected [out_features, r] with r = \
                     {r} from {CONFIG_FILE}"
                ),
            ));
        }
        layers.insert(
            key,
            HostLora {
                a: av,
                b: bv,
                r,
                in_features: ashape[1],
                out_features: bshape[0],
            },
        );
    }

    let used: Vec<Target> = {
        let mut u: Vec<Target> = layers.keys().map(|&(_, t)| t).collect();
        u.sort();
        u.dedup();
        u
    };
    let targets = match cfg.targets {
        Some(t) => {
            if let Some(&(l, bad)) = layers.keys().find(|(_, x)| !t.contains(x)) {
                return Err(Error::format(
                    &wpath,
                    format!(
                        "tensor '{}' adapts {bad}, which {CONFIG_FILE} does not list in \
                         target_modules",
                        tensor_names(l, bad).0
                    ),
                ));
            }
            // What the tensors adapt, not every module listed: a listed module with no tensor
            // (a hand-edited or partial file) adapts nothing and is not reported as adapted.
            used
        }
        None => used,
    };
    if let Some(allowed) = &cfg.layers {
        if let Some(&(l, t)) = layers.keys().find(|(l, _)| !allowed.contains(l)) {
            return Err(Error::format(
                &wpath,
                format!(
                    "tensor '{}' is in layer {l}, which layers_to_transform {allowed:?} in \
                     {CONFIG_FILE} leaves out",
                    tensor_names(l, t).0
                ),
            ));
        }
    }
    let config = LoraConfig {
        r,
        alpha: cfg.alpha,
        dropout: cfg.dropout,
        targets,
    };
    config
        .validate()
        .map_err(|e| Error::format(&cpath, e.to_string()))?;
    Ok(HostAdapter {
        config,
        base_model: cfg.base_model,
        layers,
    })
}

// ----------------------------------------------------------------------------------------------
// Merging

/// `w + scale · B·A` for one projection weight `w` `[out, in]` (any float dtype): computed in
/// f32, returned in `w`'s dtype (rounded to nearest even when that is f16 / bf16).
pub fn merge_weight(w: &HostTensor, lora: &HostLora, scale: f32) -> Result<HostTensor> {
    let (r, k, n) = (lora.r, lora.in_features, lora.out_features);
    if w.shape != [n, k] || lora.a.len() != r * k || lora.b.len() != n * r {
        return Err(Error::Shape(format!(
            "cannot merge LoRA A [{r}, {k}] / B [{n}, {r}] into a weight of shape {:?}",
            w.shape
        )));
    }
    let mut v = w.to_f32()?;
    if k > 0 {
        v.par_chunks_mut(k).enumerate().for_each(|(o, row)| {
            let mut acc = vec![0f32; k];
            for j in 0..r {
                let bj = lora.b[o * r + j];
                let arow = &lora.a[j * k..(j + 1) * k];
                for (s, &x) in acc.iter_mut().zip(arow) {
                    *s += bj * x;
                }
            }
            for (x, s) in row.iter_mut().zip(&acc) {
                *x += scale * s;
            }
        });
    }
    let merged = HostTensor::f32(w.shape.clone(), v)?;
    let merged = if w.dtype() == DType::F32 {
        merged
    } else {
        merged.to_dtype(w.dtype())?
    };
    if !merged.all_finite() {
        return Err(Error::Invalid(format!(
            "merging the adapter gives non-finite values in {} (overflow?)",
            w.dtype()
        )));
    }
    Ok(merged)
}

/// Write `src` with `adapter` merged into it as a Hugging Face LLaMA folder at `out` (which must
/// not exist): every adapted projection weight W `[out, in]` becomes W + (alpha / r) · B·A,
/// computed in f32 and stored in W's dtype; every other tensor, the config and the tokenizer
/// are written exactly as `convert::to_hf_folder` writes them. `progress(done, total)` counts
/// tensors.
pub fn merge(
    src: &dyn ModelSource,
    adapter: &HostAdapter,
    out: &Path,
    progress: impl FnMut(usize, usize),
) -> Result<()> {
    merge_as(src, adapter, out, None, progress)
}

/// `merge`, every tensor then stored in `dtype` (f32, f16 or bf16; None: as `merge` stores
/// it) — `convert::cast_for_output` after the merge, so a merged weight is rounded once.
pub fn merge_as(
    src: &dyn ModelSource,
    adapter: &HostAdapter,
    out: &Path,
    dtype: Option<DType>,
    progress: impl FnMut(usize, usize),
) -> Result<()> {
    check_weights(adapter, "cannot merge adapter")?;
    adapter.check_against(src.config())?;
    let scale = adapter.config.scale();
    let by_name: HashMap<String, &HostLora> = adapter
        .layers
        .iter()
        .map(|(&(l, t), w)| (format!("model.layers.{l}.{}.weight", t.module_path()), w))
        .collect();
    let mut merged = 0usize;
    super::convert::to_hf_folder_with(src, out, progress, |name, t| {
        let t = match by_name.get(name) {
            Some(w) => {
                merged += 1;
                // With an output dtype, merged in f32 and rounded once, by the cast below.
                let t = if dtype.is_some() && t.dtype() != DType::F32 {
                    t.to_dtype(DType::F32)?
                } else {
                    t
                };
                merge_weight(&t, w, scale).map_err(|e| match e {
                    Error::Invalid(m) | Error::Shape(m) => {
                        Error::Invalid(format!("merging into '{name}': {m}"))
                    }
                    other => other,
                })?
            }
            None => t,
        };
        super::convert::cast_for_output(name, t, dtype)
    })?;
    debug_assert_eq!(merged, by_name.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_names_parse_back() {
        for t in Target::ALL {
            for l in [0usize, 7, 31] {
                let (a, b) = tensor_names(l, t);
                assert_eq!(parse_tensor_name(&a), Some((l, t, Half::A)));
                assert_eq!(parse_tensor_name(&b), Some((l, t, Half::B)));
                let old = a.replace(".lora_A.weight", ".lora_A.default.weight");
                assert_eq!(parse_tensor_name(&old), Some((l, t, Half::A)));
            }
        }
        assert_eq!(
            tensor_names(3, Target::Gate).0,
            "base_model.model.model.layers.3.mlp.gate_proj.lora_A.weight"
        );
        for bad in [
            "base_model.model.model.layers.0.self_attn.q_proj.weight",
            "base_model.model.model.layers.x.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers..self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.+1.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_embedding_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight.extra",
            "base_model.model.lm_head.lora_A.weight",
            "model.layers.0.self_attn.q_proj.lora_A.weight",
        ] {
            assert_eq!(parse_tensor_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn merge_weight_small_exact_example() {
        // W = [[1, 2, 3], [4, 5, 6]], A = [[1, 0, 2]] (r = 1), B = [[3], [-1]], scale 0.5:
        // B·A = [[3, 0, 6], [-1, 0, -2]], W + 0.5·B·A = [[2.5, 2, 6], [3.5, 5, 5]].
        let w = HostTensor::f32(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]).unwrap();
        let l = HostLora {
            a: vec![1., 0., 2.],
            b: vec![3., -1.],
            r: 1,
            in_features: 3,
            out_features: 2,
        };
        let m = merge_weight(&w, &l, 0.5).unwrap();
        assert_eq!(m.shape, vec![2, 3]);
        assert_eq!(m.to_f32().unwrap(), vec![2.5, 2., 6., 3.5, 5., 5.]);
        // Kept in the weight's dtype.
        let wb = w.to_dtype(DType::BF16).unwrap();
        let mb = merge_weight(&wb, &l, 0.5).unwrap();
        assert_eq!(mb.dtype(), DType::BF16);
        assert_eq!(mb.to_f32().unwrap(), vec![2.5, 2., 6., 3.5, 5., 5.]);
        // Transposed shapes are refused.
        let wt = HostTensor::f32(vec![3, 2], vec![0.; 6]).unwrap();
        assert!(matches!(merge_weight(&wt, &l, 1.0), Err(Error::Shape(_))));
        // Overflowing f16 is refused rather than written as inf.
        let wh = HostTensor::f32(vec![2, 3], vec![60000.; 6])
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let big = HostLora {
            b: vec![1e4, 1e4],
            ..l.clone()
        };
        assert!(merge_weight(&wh, &big, 1.0).is_err());
    }

    fn cfg(extra: Value) -> Result<ParsedConfig> {
        let mut j = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                           "target_modules": ["q_proj", "v_proj"]});
        if let (Some(o), Some(e)) = (j.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                o.insert(k.clone(), v.clone());
            }
        }
        parse_config(Path::new("adapter_config.json"), &j.to_string())
    }

    #[test]
    fn config_parsing_variants() {
        let c = cfg(json!({})).unwrap();
        assert_eq!((c.r, c.alpha, c.dropout), (4, 8.0, 0.0));
        assert_eq!(c.targets, Some(vec![Target::Q, Target::V]));
        assert_eq!(c.base_model, "");
        let c = cfg(json!({"r": 16.0, "lora_alpha": 32.5, "lora_dropout": 0.05,
                           "base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}))
        .unwrap();
        assert_eq!((c.r, c.alpha, c.dropout), (16, 32.5, 0.05));
        assert_eq!(c.base_model, "meta-llama/Llama-2-7b-hf");
        let c = cfg(json!({"target_modules": "down_proj"})).unwrap();
        assert_eq!(c.targets, Some(vec![Target::Down]));
        let c = cfg(json!({"target_modules": "all-linear"})).unwrap();
        assert_eq!(c.targets, Some(Target::ALL.to_vec()));
        let c = cfg(json!({"target_modules": ".*\\.(q_proj|v_proj)"})).unwrap();
        assert_eq!(c.targets, None);
        let c = cfg(json!({"target_modules": ["self_attn.o_proj", "up_proj", "o_proj"]})).unwrap();
        assert_eq!(c.targets, Some(vec![Target::O, Target::Up]));
        // Null is as good as absent; empty patterns are fine.
        cfg(
            json!({"use_dora": null, "rank_pattern": {}, "modules_to_save": null,
                   "bias": "none", "fan_in_fan_out": false}),
        )
        .unwrap();

        let unsupported = |e: Value| matches!(cfg(e), Err(Error::Unsupported { .. }));
        let format = |e: Value| matches!(cfg(e), Err(Error::Format { .. }));
        assert!(unsupported(json!({"peft_type": "PREFIX_TUNING"})));
        assert!(unsupported(json!({"use_dora": true})));
        assert!(unsupported(json!({"use_rslora": true})));
        assert!(unsupported(json!({"fan_in_fan_out": true})));
        assert!(unsupported(json!({"bias": "all"})));
        assert!(unsupported(json!({"rank_pattern": {"q_proj": 8}})));
        assert!(unsupported(json!({"alpha_pattern": {"q_proj": 8}})));
        assert!(unsupported(json!({"modules_to_save": ["lm_head"]})));
        assert!(unsupported(
            json!({"target_modules": ["q_proj", "lm_head"]})
        ));
        assert!(format(json!({"peft_type": null})));
        assert!(format(json!({"peft_type": 3})));
        assert!(format(json!({"r": 0})));
        assert!(format(json!({"r": 2.5})));
        assert!(format(json!({"r": -4})));
        assert!(format(json!({"r": "8"})));
        assert!(format(json!({"lora_alpha": "16"})));
        assert!(format(json!({"lora_dropout": 1.5})));
        assert!(format(json!({"target_modules": []})));
        assert!(format(json!({"target_modules": null})));
        assert!(format(json!({"target_modules": [1]})));
        assert!(format(json!({"base_model_name_or_path": 5})));
        assert!(matches!(
            parse_config(Path::new("c.json"), "[1, 2]"),
            Err(Error::Format { .. })
        ));
        assert!(matches!(
            parse_config(Path::new("c.json"), "{\"peft_type\": "),
            Err(Error::Format { .. })
        ));
    }

    #[test]
    fn json_numbers_read_back_bit_exact() {
        for x in [0.0f32, 0.05, 0.1, 16.0, 32.5, 1.0 / 3.0, 7e-8] {
            let v = json_number(x);
            assert_eq!(v.as_f64().unwrap() as f32, x, "{v}");
        }
        assert_eq!(json_number(16.0).to_string(), "16");
        assert_eq!(json_number(0.05).to_string(), "0.05");
        assert_eq!(json_float(0.0).to_string(), "0.0");
        assert_eq!(json_float(0.1).as_f64(), Some(0.1));
    }
}
