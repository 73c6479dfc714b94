//! PEFT adapter files: bit-exact round trip, PEFT's exact tensor names / shapes / config
//! fields, what `load` accepts and refuses, and merging into a base model.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::fixture;
use recforge::error::Error;
use recforge::model::adapter::{self, CONFIG_FILE, WEIGHTS_FILE};
use recforge::model::convert::safetensors_bytes;
use recforge::model::fixture::FixtureSpec;
use recforge::model::lora::{HostAdapter, LoraConfig, Target};
use recforge::model::{self as model, LlamaConfig};
use recforge::rng::Rng;
use recforge::tensor::{DType, HostTensor};
use serde_json::{json, Value};

fn lora(r: usize, alpha: f32, targets: &[Target]) -> LoraConfig {
    LoraConfig {
        r,
        alpha,
        dropout: 0.05,
        targets: targets.to_vec(),
    }
}

/// `HostAdapter::init` (B = 0) with B then filled with random non-zero values.
fn random_adapter(cfg: &LlamaConfig, l: &LoraConfig, seed: u64) -> HostAdapter {
    let mut ad = HostAdapter::init(cfg, l, seed, "tiny/base-model").unwrap();
    let mut rng = Rng::new(seed ^ 0xB);
    for w in ad.layers.values_mut() {
        for x in &mut w.b {
            *x = rng.range(-0.5, 0.5);
        }
        assert!(w.b.iter().all(|&x| x != 0.0));
    }
    ad
}

fn tiny_config() -> (tempfile::TempDir, LlamaConfig) {
    let (d, f) = fixture(&FixtureSpec::default());
    (d, f.config)
}

fn err_text<T: std::fmt::Debug>(r: Result<T, Error>) -> (Error, String) {
    let e = r.expect_err("expected an error");
    let s = e.to_string();
    (e, s)
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|it| {
            it.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// name → (dtype, shape, [start, end]) of a safetensors header.
type Header = BTreeMap<String, (String, Vec<usize>, [usize; 2])>;

/// Parse a safetensors file's header by hand; also returns where the data starts.
fn st_header(bytes: &[u8]) -> (usize, Header) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let h: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut out = BTreeMap::new();
    for (k, v) in h.as_object().unwrap() {
        if k == "__metadata__" {
            continue;
        }
        let dtype = v["dtype"].as_str().unwrap().to_string();
        let shape = v["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let o = v["data_offsets"].as_array().unwrap();
        let off = [
            o[0].as_u64().unwrap() as usize,
            o[1].as_u64().unwrap() as usize,
        ];
        out.insert(k.clone(), (dtype, shape, off));
    }
    (8 + n, out)
}

#[test]
fn save_load_round_trip_is_bit_exact() {
    let (_d, cfg) = tiny_config();
    for (r, alpha, targets) in [
        (4, 12.5, Target::ALL.to_vec()),
        (1, 16.0, vec![Target::Q, Target::V]),
        (3, 0.3, vec![Target::Down]),
    ] {
        let l = lora(r, alpha, &targets);
        let ad = random_adapter(&cfg, &l, 11 + r as u64);
        assert_eq!(ad.layers.len(), cfg.num_hidden_layers * targets.len());
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("nested/adapter");
        adapter::save(&ad, &out).unwrap();
        assert_eq!(files_in(&out), vec![CONFIG_FILE, WEIGHTS_FILE]);
        let back = adapter::load(&out).unwrap();
        assert_eq!(back, ad, "r={r}");
        // Bit-exact, not just ==: compare the raw bits of every value.
        for (k, w) in &ad.layers {
            let b = &back.layers[k];
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&w.a), bits(&b.a));
            assert_eq!(bits(&w.b), bits(&b.b));
        }
        assert_eq!(back.config.alpha.to_bits(), alpha.to_bits());
        assert_eq!(back.config.dropout.to_bits(), 0.05f32.to_bits());
        // A path to one of the files works too.
        assert_eq!(adapter::load(&out.join(CONFIG_FILE)).unwrap(), ad);
        // Saving again over an existing adapter replaces it, leaving no temporary files.
        let mut ad2 = ad.clone();
        ad2.layers.values_mut().next().unwrap().b[0] = 0.25;
        adapter::save(&ad2, &out).unwrap();
        assert_eq!(files_in(&out), vec![CONFIG_FILE, WEIGHTS_FILE]);
        assert_eq!(adapter::load(&out).unwrap(), ad2);
        assert_ne!(ad2, ad);
    }
}

#[test]
fn saved_files_have_pefts_names_shapes_and_config() {
    let (_d, cfg) = tiny_config();
    // The fixture: hidden 64, 4 heads × 16, 2 kv heads, intermediate 96, 2 layers.
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers
        ),
        (64, 96, 2)
    );
    let l = lora(4, 8.0, &Target::ALL);
    let ad = random_adapter(&cfg, &l, 5);
    let dir = tempfile::tempdir().unwrap();
    adapter::save(&ad, dir.path()).unwrap();

    let bytes = std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
    let (data_start, header) = st_header(&bytes);
    // (module path, in, out), written out by hand.
    let modules = [
        ("self_attn.q_proj", 64, 64),
        ("self_attn.k_proj", 64, 32),
        ("self_attn.v_proj", 64, 32),
        ("self_attn.o_proj", 64, 64),
        ("mlp.gate_proj", 64, 96),
        ("mlp.up_proj", 64, 96),
        ("mlp.down_proj", 96, 64),
    ];
    let mut expected = BTreeMap::new();
    for layer in 0..2 {
        for (m, i, o) in modules {
            let stem = format!("base_model.model.model.layers.{layer}.{m}");
            expected.insert(format!("{stem}.lora_A.weight"), vec![4, i]);
            expected.insert(format!("{stem}.lora_B.weight"), vec![o, 4]);
        }
    }
    assert_eq!(expected.len(), 28);
    let got: BTreeMap<String, Vec<usize>> = header
        .iter()
        .map(|(k, (_, s, _))| (k.clone(), s.clone()))
        .collect();
    assert_eq!(got, expected);
    let mut total = 0;
    for (name, (dtype, shape, [s, e])) in &header {
        assert_eq!(dtype, "F32", "{name}");
        assert_eq!(e - s, 4 * shape.iter().product::<usize>(), "{name}");
        total += e - s;
    }
    assert_eq!(bytes.len(), data_start + total, "no trailing bytes");
    // The values are the adapter's, little-endian f32, in PEFT's layout.
    let (_, _, [s, e]) = &header["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"];
    let vals: Vec<f32> = bytes[data_start + s..data_start + e]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(vals, ad.layers[&(1, Target::Down)].b);
    let (_, _, [s, e]) = &header["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"];
    let first = f32::from_le_bytes(
        bytes[data_start + s..data_start + s + 4]
            .try_into()
            .unwrap(),
    );
    assert_eq!(first, ad.layers[&(0, Target::K)].a[0]);
    assert_eq!(e - s, 4 * 4 * 64);

    let c: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap())
            .unwrap();
    assert_eq!(c["peft_type"], "LORA");
    assert_eq!(c["task_type"], "CAUSAL_LM");
    assert_eq!(c["r"], 4);
    assert_eq!(c["lora_alpha"].as_f64(), Some(8.0));
    assert!((c["lora_dropout"].as_f64().unwrap() - 0.05).abs() < 1e-9);
    assert_eq!(
        c["target_modules"],
        json!([
            "down_proj",
            "gate_proj",
            "k_proj",
            "o_proj",
            "q_proj",
            "up_proj",
            "v_proj"
        ])
    );
    assert_eq!(c["bias"], "none");
    assert_eq!(c["base_model_name_or_path"], "tiny/base-model");
    assert_eq!(c["fan_in_fan_out"], false);
    assert_eq!(c["inference_mode"], true);
    assert!(c.get("modules_to_save").is_some_and(Value::is_null));
    assert_eq!(c["init_lora_weights"], true);
    assert_eq!(c["use_rslora"], false);
    assert_eq!(c["use_dora"], false);
    assert_eq!(c["rank_pattern"], json!({}));
    assert_eq!(c["alpha_pattern"], json!({}));

    // An adapter without a base model records null.
    let mut nb = ad.clone();
    nb.base_model.clear();
    let d2 = tempfile::tempdir().unwrap();
    adapter::save(&nb, d2.path()).unwrap();
    let c: Value =
        serde_json::from_str(&std::fs::read_to_string(d2.path().join(CONFIG_FILE)).unwrap())
            .unwrap();
    assert!(c["base_model_name_or_path"].is_null());
    assert_eq!(adapter::load(d2.path()).unwrap().base_model, "");
}

/// Write an adapter folder by hand: a config and tensors (name, tensor).
fn write_raw(dir: &Path, config: &Value, tensors: &[(&str, HostTensor)]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(CONFIG_FILE), config.to_string()).unwrap();
    let refs: Vec<(String, &HostTensor)> =
        tensors.iter().map(|(n, t)| (n.to_string(), t)).collect();
    std::fs::write(dir.join(WEIGHTS_FILE), safetensors_bytes(&refs)).unwrap();
}

fn base_config() -> Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 2,
        "lora_alpha": 4,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "base_model_name_or_path": null,
    })
}

fn a_q() -> (&'static str, HostTensor) {
    (
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        HostTensor::f32(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]).unwrap(),
    )
}
fn b_q() -> (&'static str, HostTensor) {
    (
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        HostTensor::f32(vec![5, 2], (0..10).map(|i| i as f32 * 0.5).collect()).unwrap(),
    )
}

#[test]
fn load_accepts_what_peft_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = base_config();
    let o = c.as_object_mut().unwrap();
    o.insert("r".into(), json!(2.0));
    o.insert("lora_alpha".into(), json!(5.0));
    o.insert("target_modules".into(), json!("v_proj"));
    o.insert("some_future_field".into(), json!({"x": [1, 2]}));
    o.insert("peft_version".into(), json!("0.13.2"));
    o.insert("layers_to_transform".into(), Value::Null);
    o.insert("use_dora".into(), json!(false));
    o.insert("rank_pattern".into(), json!({}));
    o.insert("base_model_name_or_path".into(), json!("org/model"));
    // f16 A and bf16 B under the older `.default.` names; all values exact in both types.
    let a = HostTensor::f32(vec![2, 4], vec![0.5, -1., 2., 0.25, 3., -0.125, 1.5, 8.])
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let b = HostTensor::f32(vec![3, 2], vec![1., 2., -3., 4., 0.75, -6.])
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    write_raw(
        dir.path(),
        &c,
        &[
            (
                "base_model.model.model.layers.3.self_attn.v_proj.lora_A.default.weight",
                a,
            ),
            (
                "base_model.model.model.layers.3.self_attn.v_proj.lora_B.default.weight",
                b,
            ),
        ],
    );
    let ad = adapter::load(dir.path()).unwrap();
    assert_eq!(ad.config.r, 2);
    assert_eq!(ad.config.alpha, 5.0);
    assert_eq!(ad.config.scale(), 2.5);
    assert_eq!(ad.config.targets, vec![Target::V]);
    assert_eq!(ad.base_model, "org/model");
    assert_eq!(ad.layers.len(), 1);
    let w = &ad.layers[&(3, Target::V)];
    assert_eq!((w.r, w.in_features, w.out_features), (2, 4, 3));
    assert_eq!(w.a, vec![0.5, -1., 2., 0.25, 3., -0.125, 1.5, 8.]);
    assert_eq!(w.b, vec![1., 2., -3., 4., 0.75, -6.]);

    // A regex target_modules: the tensors say what is adapted.
    let mut c = base_config();
    c["target_modules"] = json!(".*\\.(q_proj|v_proj)$");
    write_raw(dir.path(), &c, &[a_q(), b_q()]);
    let ad = adapter::load(dir.path()).unwrap();
    assert_eq!(ad.config.targets, vec![Target::Q]);
    assert_eq!(ad.base_model, "");
    let w = &ad.layers[&(0, Target::Q)];
    assert_eq!((w.in_features, w.out_features), (3, 5));
}

#[test]
fn load_refuses_bad_adapters() {
    let case = |config: Value, tensors: &[(&str, HostTensor)]| {
        let dir = tempfile::tempdir().unwrap();
        write_raw(dir.path(), &config, tensors);
        err_text(adapter::load(dir.path()))
    };
    let ok = || vec![a_q(), b_q()];
    {
        // Sanity: the baseline loads. It lists q_proj and v_proj but holds q_proj only: the
        // adapter is reported as what its tensors adapt.
        let dir = tempfile::tempdir().unwrap();
        write_raw(dir.path(), &base_config(), &ok());
        assert_eq!(
            adapter::load(dir.path()).unwrap().config.targets,
            [Target::Q]
        );
        // layers_to_transform naming the tensors' layer (a number or a list) is fine.
        for layers in [json!(0), json!([0, 5])] {
            let mut c = base_config();
            c["layers_to_transform"] = layers;
            write_raw(dir.path(), &c, &ok());
            adapter::load(dir.path()).unwrap();
        }
    }

    // Wrong shapes for the config's r.
    let mut c = base_config();
    c["r"] = json!(3);
    let (e, s) = case(c, &ok());
    assert!(matches!(e, Error::Format { .. }), "{s}");
    assert!(s.contains("lora_A.weight") && s.contains("r = 3"), "{s}");
    // A and B disagreeing on r.
    let bad_b = (b_q().0, HostTensor::f32(vec![5, 1], vec![0.; 5]).unwrap());
    let (_, s) = case(base_config(), &[a_q(), bad_b]);
    assert!(s.contains("lora_B.weight") && s.contains("[5, 1]"), "{s}");
    // A 1-D tensor.
    let flat = (a_q().0, HostTensor::f32(vec![6], vec![0.; 6]).unwrap());
    let (_, s) = case(base_config(), &[flat, b_q()]);
    assert!(s.contains("[6]"), "{s}");

    // Unknown tensor names.
    for extra in [
        "base_model.model.lm_head.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
        "base_model.model.model.layers.0.self_attn.q_proj.weight",
    ] {
        let mut t = ok();
        t.push((extra, HostTensor::f32(vec![2], vec![0.; 2]).unwrap()));
        let (e, s) = case(base_config(), &t);
        assert!(matches!(e, Error::Format { .. }), "{s}");
        assert!(s.contains(extra) && s.contains(WEIGHTS_FILE), "{s}");
    }
    // A without B and B without A.
    let (_, s) = case(base_config(), &[a_q()]);
    assert!(s.contains("no matching lora_B"), "{s}");
    let (_, s) = case(base_config(), &[b_q()]);
    assert!(s.contains("no matching lora_A"), "{s}");
    // No tensors at all.
    let (_, s) = case(base_config(), &[]);
    assert!(s.contains("no LoRA tensors"), "{s}");
    // The same weight under both names.
    let mut t = ok();
    t.push((
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        a_q().1,
    ));
    let (_, s) = case(base_config(), &t);
    assert!(s.contains("same LoRA weight"), "{s}");
    // Tensors in a layer that layers_to_transform leaves out; a malformed list.
    for (layers, want) in [
        (json!([1, 2]), "layers_to_transform [1, 2]"),
        (json!(3), "layers_to_transform [3]"),
        (json!("0"), "'layers_to_transform' must be"),
        (json!([0, -1]), "'layers_to_transform' holds -1"),
    ] {
        let mut c = base_config();
        c["layers_to_transform"] = layers;
        let (e, s) = case(c, &ok());
        assert!(matches!(e, Error::Format { .. }), "{s}");
        assert!(s.contains(want), "{s}");
    }
    // A tensor of a module the config does not target.
    let mut c = base_config();
    c["target_modules"] = json!(["v_proj"]);
    let (_, s) = case(c, &ok());
    assert!(s.contains("q_proj") && s.contains("target_modules"), "{s}");
    // Integer and f64 tensors.
    let (e, s) = case(
        base_config(),
        &[
            a_q(),
            (
                b_q().0,
                HostTensor::new(vec![5, 2], recforge::tensor::HostData::I32(vec![1; 10])).unwrap(),
            ),
        ],
    );
    assert!(matches!(e, Error::Unsupported { .. }), "{s}");
    assert!(s.contains("lora_B.weight") && s.contains("I32"), "{s}");
    // Non-finite values.
    let nan_a = (
        a_q().0,
        HostTensor::f32(vec![2, 3], vec![1., 2., f32::NAN, 4., 5., 6.]).unwrap(),
    );
    let (_, s) = case(base_config(), &[nan_a, b_q()]);
    assert!(
        s.contains("lora_A.weight") && s.contains("non-finite"),
        "{s}"
    );

    // Config problems.
    for (key, val, want) in [
        ("peft_type", json!("IA3"), "only LORA"),
        ("peft_type", json!("PREFIX_TUNING"), "only LORA"),
        ("use_dora", json!(true), "DoRA"),
        ("rank_pattern", json!({"q_proj": 8}), "rank_pattern"),
        ("bias", json!("lora_only"), "bias"),
        ("use_rslora", json!(true), "rank-stabilized"),
        ("modules_to_save", json!(["lm_head"]), "modules_to_save"),
    ] {
        let mut c = base_config();
        c[key] = val;
        let (e, s) = case(c, &ok());
        assert!(matches!(e, Error::Unsupported { .. }), "{key}: {s}");
        assert!(s.contains(want) && s.contains(CONFIG_FILE), "{key}: {s}");
    }
    let mut c = base_config();
    c.as_object_mut().unwrap().remove("peft_type");
    let (e, s) = case(c, &ok());
    assert!(
        matches!(e, Error::Format { .. }) && s.contains("peft_type"),
        "{s}"
    );
    let mut c = base_config();
    c["r"] = json!(1.5);
    let (_, s) = case(c, &ok());
    assert!(s.contains("'r'"), "{s}");

    // Corrupt config JSON.
    let dir = tempfile::tempdir().unwrap();
    write_raw(dir.path(), &base_config(), &ok());
    std::fs::write(dir.path().join(CONFIG_FILE), "{\"peft_type\": \"LORA\", ").unwrap();
    let (e, s) = err_text(adapter::load(dir.path()));
    assert!(
        matches!(e, Error::Format { .. }) && s.contains(CONFIG_FILE),
        "{s}"
    );
}

#[test]
fn load_refuses_bin_missing_and_truncated_files() {
    let (_d, cfg) = tiny_config();
    let ad = random_adapter(&cfg, &lora(2, 4.0, &[Target::Q, Target::K]), 3);

    // Only the PyTorch pickle.
    let dir = tempfile::tempdir().unwrap();
    adapter::save(&ad, dir.path()).unwrap();
    std::fs::rename(
        dir.path().join(WEIGHTS_FILE),
        dir.path().join("adapter_model.bin"),
    )
    .unwrap();
    let (e, s) = err_text(adapter::load(dir.path()));
    assert!(matches!(e, Error::Unsupported { .. }), "{s}");
    assert!(
        s.contains("PyTorch .bin adapters are not supported; convert to safetensors"),
        "{s}"
    );
    // Neither file: an I/O error naming the safetensors file.
    std::fs::remove_file(dir.path().join("adapter_model.bin")).unwrap();
    let (e, s) = err_text(adapter::load(dir.path()));
    assert!(
        matches!(e, Error::Io { .. }) && s.contains(WEIGHTS_FILE),
        "{s}"
    );
    // No config.
    let empty = tempfile::tempdir().unwrap();
    let (e, s) = err_text(adapter::load(empty.path()));
    assert!(
        matches!(e, Error::Io { .. }) && s.contains(CONFIG_FILE),
        "{s}"
    );

    // Truncated at several points: inside the data, inside the header, inside the length.
    let dir = tempfile::tempdir().unwrap();
    adapter::save(&ad, dir.path()).unwrap();
    // A path to one of its files is the adapter; any other file (a data file given by
    // mistake) is named as not an adapter, not as a missing config beside it.
    let via_file = adapter::load(&dir.path().join(CONFIG_FILE)).unwrap();
    assert_eq!(via_file.layers.len(), ad.layers.len());
    let other = dir.path().join("train.json");
    std::fs::write(&other, "[]").unwrap();
    let (e, s) = err_text(adapter::load(&other));
    assert!(
        matches!(e, Error::Invalid(_))
            && s.contains("train.json")
            && s.contains("not a PEFT adapter"),
        "{s}"
    );
    let full = std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
    for keep in [full.len() - 1, full.len() - 100, 200, 20, 5, 0] {
        std::fs::write(dir.path().join(WEIGHTS_FILE), &full[..keep]).unwrap();
        let (e, s) = err_text(adapter::load(dir.path()));
        assert!(matches!(e, Error::Format { .. }), "{keep}: {s}");
        assert!(s.contains(WEIGHTS_FILE) && s.contains("truncated"), "{s}");
    }
    // Garbage header.
    let mut bad = full.clone();
    bad[10] = 0xFF;
    std::fs::write(dir.path().join(WEIGHTS_FILE), &bad).unwrap();
    let (e, _) = err_text(adapter::load(dir.path()));
    assert!(matches!(e, Error::Format { .. }));
}

#[test]
fn save_refuses_empty_and_non_finite_adapters() {
    let (_d, cfg) = tiny_config();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ad");

    let l = lora(2, 4.0, &[Target::Q, Target::V]);
    let mut empty = HostAdapter::init(&cfg, &l, 1, "").unwrap();
    empty.layers.clear();
    let (_, s) = err_text(adapter::save(&empty, &out));
    assert!(s.contains("no LoRA layers"), "{s}");
    assert!(!out.exists(), "nothing written for a refused save");

    let good = random_adapter(&cfg, &l, 2);
    for (which, idx) in [("lora_A", 3), ("lora_B", 0)] {
        for bad_val in [f32::NAN, f32::INFINITY] {
            let mut ad = good.clone();
            let w = ad.layers.get_mut(&(1, Target::V)).unwrap();
            if which == "lora_A" {
                w.a[idx] = bad_val;
            } else {
                w.b[idx] = bad_val;
            }
            let (_, s) = err_text(adapter::save(&ad, &out));
            let name = format!("base_model.model.model.layers.1.self_attn.v_proj.{which}.weight");
            assert!(s.contains(&name) && s.contains("non-finite"), "{s}");
            assert!(!out.exists());
        }
    }

    // Empty tensors, and tensors whose length disagrees with r.
    let mut ad = good.clone();
    let w = ad.layers.get_mut(&(0, Target::Q)).unwrap();
    w.in_features = 0;
    w.a.clear();
    assert!(adapter::save(&ad, &out).is_err());
    let mut ad = good.clone();
    ad.layers.get_mut(&(0, Target::Q)).unwrap().b.pop();
    let (e, _) = err_text(adapter::save(&ad, &out));
    assert!(matches!(e, Error::Shape(_)));
    let mut ad = good.clone();
    ad.config.r = 3;
    assert!(adapter::save(&ad, &out).is_err());
    // A layer for a target the config does not list.
    let mut ad = good.clone();
    ad.config.targets = vec![Target::Q];
    let (_, s) = err_text(adapter::save(&ad, &out));
    assert!(s.contains("v_proj"), "{s}");
    assert!(!out.exists());

    // A failed save over an existing adapter leaves it intact.
    adapter::save(&good, &out).unwrap();
    let mut ad = good.clone();
    ad.layers.get_mut(&(0, Target::Q)).unwrap().a[0] = f32::NAN;
    assert!(adapter::save(&ad, &out).is_err());
    assert_eq!(adapter::load(&out).unwrap(), good);
    assert_eq!(files_in(&out), vec![CONFIG_FILE, WEIGHTS_FILE]);
}

/// Unit roundoff of a float dtype (half an ulp at 1.0).
fn unit_roundoff(d: DType) -> f64 {
    match d {
        DType::F32 => 2f64.powi(-24),
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
        other => panic!("not a float type: {other}"),
    }
}

#[test]
fn merge_adds_scaled_b_times_a_and_keeps_everything_else() {
    let (d, f) = fixture(&FixtureSpec::default());
    let src = model::open(&f.hf_dir).unwrap();
    let cfg = src.config().clone();
    // q, v, o, gate: their fixture weights are f32, bf16 and f16 across the two layers; k, up
    // and down stay unadapted.
    let targets = [Target::Q, Target::V, Target::O, Target::Gate];
    let ad = random_adapter(&cfg, &lora(4, 8.0, &targets), 21);
    let scale = 8.0f64 / 4.0;
    let out = d.path().join("merged");
    let mut calls = vec![];
    adapter::merge(src.as_ref(), &ad, &out, |i, n| calls.push((i, n))).unwrap();
    let n_tensors = cfg.tensor_names().len();
    assert_eq!(calls.last(), Some(&(n_tensors, n_tensors)));
    assert_eq!(calls.len(), n_tensors);

    let merged = model::open(&out).unwrap();
    assert_eq!(merged.config(), src.config());
    let text = "the cat sat on the mat";
    assert_eq!(
        merged.tokenizer().unwrap().encode(text, true).unwrap(),
        src.tokenizer().unwrap().encode(text, true).unwrap()
    );
    let mut seen_dtypes = vec![];
    let mut adapted = 0;
    for name in cfg.tensor_names() {
        let w = src.tensor(&name).unwrap();
        let m = merged.tensor(&name).unwrap();
        assert_eq!(m.dtype(), w.dtype(), "{name}");
        assert_eq!(m.shape, w.shape, "{name}");
        let hit = (0..cfg.num_hidden_layers)
            .flat_map(|l| targets.iter().map(move |&t| (l, t)))
            .find(|(l, t)| name == format!("model.layers.{l}.{}.weight", t.module_path()));
        let Some(key) = hit else {
            assert_eq!(
                m.data.as_bytes(),
                w.data.as_bytes(),
                "{name} must be untouched"
            );
            continue;
        };
        adapted += 1;
        seen_dtypes.push(w.dtype());
        let lw = &ad.layers[&key];
        let (r, k, n) = (lw.r, lw.in_features, lw.out_features);
        assert_eq!(w.shape, vec![n, k]);
        let wv = w.to_f32().unwrap();
        let mv = m.to_f32().unwrap();
        let u = unit_roundoff(w.dtype());
        let mut max_change = 0f64;
        for o in 0..n {
            for i in 0..k {
                let mut delta = 0f64;
                for j in 0..r {
                    delta += lw.b[o * r + j] as f64 * lw.a[j * k + i] as f64;
                }
                let want = wv[o * k + i] as f64 + scale * delta;
                let got = mv[o * k + i] as f64;
                // Rounding to the dtype (≤ u·|want|) plus f32 accumulation error.
                let tol = u * want.abs() + 1e-6 * (1.0 + scale * delta.abs()) + 1e-7;
                assert!(
                    (got - want).abs() <= tol,
                    "{name}[{o},{i}]: got {got}, want {want} (tol {tol})"
                );
                max_change = max_change.max((got - wv[o * k + i] as f64).abs());
            }
        }
        assert!(max_change > 0.05, "{name}: the merge changed nothing");
    }
    assert_eq!(adapted, cfg.num_hidden_layers * targets.len());
    for dt in [DType::F32, DType::F16, DType::BF16] {
        assert!(
            seen_dtypes.contains(&dt),
            "fixture should adapt a {dt} weight"
        );
    }
    assert_eq!(
        files_in(d.path())
            .iter()
            .filter(|f| f.contains("tmp"))
            .count(),
        0
    );
}

#[test]
fn merging_into_bf16_rounds_the_f32_merge_once() {
    // The fixture's weights are f32, bf16 and f16: merged in f32 and then rounded to bf16 once,
    // whatever each weight's own dtype.
    let (d, f) = fixture(&FixtureSpec::default());
    let src = model::open(&f.hf_dir).unwrap();
    let cfg = src.config().clone();
    let ad = random_adapter(
        &cfg,
        &lora(4, 8.0, &[Target::Q, Target::V, Target::Down]),
        5,
    );
    let (wide, narrow) = (d.path().join("f32"), d.path().join("bf16"));
    adapter::merge_as(src.as_ref(), &ad, &wide, Some(DType::F32), |_, _| {}).unwrap();
    adapter::merge_as(src.as_ref(), &ad, &narrow, Some(DType::BF16), |_, _| {}).unwrap();
    let (w, n) = (model::open(&wide).unwrap(), model::open(&narrow).unwrap());
    for name in cfg.tensor_names() {
        let (a, b) = (w.tensor(&name).unwrap(), n.tensor(&name).unwrap());
        assert_eq!((a.dtype(), b.dtype()), (DType::F32, DType::BF16), "{name}");
        let want: Vec<f32> = a
            .to_f32()
            .unwrap()
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect();
        assert_eq!(b.to_f32().unwrap(), want, "{name}");
    }
    // The f32 merge of a bf16 weight is the plain merge of it (no rounding back to bf16).
    let plain = d.path().join("plain");
    adapter::merge(src.as_ref(), &ad, &plain, |_, _| {}).unwrap();
    let p = model::open(&plain).unwrap();
    let mut differ = 0;
    for name in cfg.tensor_names() {
        let (a, b) = (w.tensor(&name).unwrap(), p.tensor(&name).unwrap());
        if b.dtype() == DType::F32 {
            assert_eq!(a.to_f32().unwrap(), b.to_f32().unwrap(), "{name}");
        } else if a.to_f32().unwrap() != b.to_f32().unwrap() {
            differ += 1;
        }
    }
    assert!(
        differ > 0,
        "some merged bf16 / f16 weight keeps precision in f32"
    );
}

#[test]
fn merging_a_fresh_adapter_is_the_identity() {
    // B = 0 after init: W + 0 must come back bit for bit, whatever the dtype.
    let (d, f) = fixture(&FixtureSpec {
        tied: false,
        ..Default::default()
    });
    let src = model::open(&f.hf_dir).unwrap();
    let ad = HostAdapter::init(src.config(), &lora(2, 16.0, &Target::ALL), 4, "").unwrap();
    let out = d.path().join("merged");
    adapter::merge(src.as_ref(), &ad, &out, |_, _| {}).unwrap();
    let merged = model::open(&out).unwrap();
    for name in src.config().tensor_names() {
        let (a, b) = (src.tensor(&name).unwrap(), merged.tensor(&name).unwrap());
        assert_eq!(a.dtype(), b.dtype(), "{name}");
        assert_eq!(a.data.as_bytes(), b.data.as_bytes(), "{name}");
    }
}

#[test]
fn merge_refuses_existing_output_and_mismatched_adapters() {
    let (d, f) = fixture(&FixtureSpec::default());
    let src = model::open(&f.hf_dir).unwrap();
    let cfg = src.config().clone();
    let ad = random_adapter(&cfg, &lora(2, 4.0, &[Target::Q]), 9);

    // An existing folder (even empty) or file is never overwritten.
    let existing = d.path().join("exists");
    std::fs::create_dir(&existing).unwrap();
    let (e, s) = err_text(adapter::merge(src.as_ref(), &ad, &existing, |_, _| {}));
    assert!(
        matches!(e, Error::Io { .. }) && s.contains("already exists"),
        "{s}"
    );
    assert!(files_in(&existing).is_empty());
    let file = d.path().join("file");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(adapter::merge(src.as_ref(), &ad, &file, |_, _| {}).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    // An adapter for another model: a layer past the end, or the wrong features.
    let out = d.path().join("out");
    let mut extra = ad.clone();
    let w = extra.layers[&(0, Target::Q)].clone();
    extra.layers.insert((cfg.num_hidden_layers, Target::Q), w);
    let (e, _) = err_text(adapter::merge(src.as_ref(), &extra, &out, |_, _| {}));
    assert!(matches!(e, Error::Shape(_)));
    let big = FixtureSpec {
        hidden: 128,
        ..Default::default()
    };
    let other_cfg = fixture(&big).1.config;
    let other = random_adapter(&other_cfg, &lora(2, 4.0, &[Target::Q]), 9);
    let (e, _) = err_text(adapter::merge(src.as_ref(), &other, &out, |_, _| {}));
    assert!(matches!(e, Error::Shape(_)));
    // Non-finite weights.
    let mut nan = ad.clone();
    nan.layers.get_mut(&(1, Target::Q)).unwrap().b[0] = f32::NAN;
    assert!(adapter::merge(src.as_ref(), &nan, &out, |_, _| {}).is_err());
    assert!(!out.exists(), "a refused merge writes nothing");
    assert_eq!(
        files_in(d.path())
            .iter()
            .filter(|f| f.contains("tmp"))
            .count(),
        0
    );

    // And the good adapter then merges fine (from the GGUF copy too).
    adapter::merge(src.as_ref(), &ad, &out, |_, _| {}).unwrap();
    let gg = model::open(&f.gguf).unwrap();
    let out2 = d.path().join("out-gguf");
    adapter::merge(gg.as_ref(), &ad, &out2, |_, _| {}).unwrap();
    let (a, b) = (model::open(&out).unwrap(), model::open(&out2).unwrap());
    // Layer 0 q is stored as f32 in both copies with the same values.
    let n = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(
        a.tensor(n).unwrap().to_f32().unwrap(),
        b.tensor(n).unwrap().to_f32().unwrap()
    );
}
