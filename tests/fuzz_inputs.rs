//! Corrupted files never panic: every reader of user files (GGUF, a Hugging Face folder's
//! safetensors / config / tokenizer, a PEFT adapter, a training checkpoint, MovieLens and
//! TALLRec files, `rec prune`'s scores files, llama.cpp vocabularies) is fed seeded
//! random corruptions of a valid file — bytes overwritten in its header, lengths and counts
//! replaced by extreme values, the file cut short — and must either load or return an error
//! that names the file. A panic fails the test with the corruption that caused it.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use common::fixture;
use recforge::backend::cpu::Cpu;
use recforge::model::fixture::FixtureSpec;
use recforge::model::gguf::GgufFile;
use recforge::model::lora::parse_targets;
use recforge::model::{self, adapter, Llama, LoadOptions};
use recforge::rng::Rng;
use recforge::train::{DevAdapter, Example, TrainConfig, Trainer};

/// Values that break length and offset arithmetic.
const EXTREMES: [u64; 10] = [
    0,
    1,
    7,
    0xFF,
    0x7FFF_FFFF,
    0xFFFF_FFFF,
    1 << 32,
    1 << 40,
    (1 << 63) - 1,
    u64::MAX,
];

/// One seeded corruption of `bytes`, whose first `head` bytes hold its header (the part a
/// reader parses; corrupting tensor data only changes numbers). Returns the new bytes and a
/// description for the failure message.
fn corrupt(bytes: &[u8], head: usize, rng: &mut Rng) -> (Vec<u8>, String) {
    let mut b = bytes.to_vec();
    let head = head.clamp(1, b.len());
    let at =
        |rng: &mut Rng, width: usize| rng.below((head.saturating_sub(width) + 1) as u64) as usize;
    let what = match rng.below(6) {
        0 => {
            let i = at(rng, 1);
            b[i] = rng.below(256) as u8;
            format!("byte {i} set to {:#04x}", b[i])
        }
        1 => {
            let i = at(rng, 1);
            let bit = rng.below(8);
            b[i] ^= 1 << bit;
            format!("bit {bit} of byte {i} flipped")
        }
        2 if b.len() >= 8 => {
            let i = at(rng, 8).min(b.len() - 8);
            let v = EXTREMES[rng.below(EXTREMES.len() as u64) as usize];
            b[i..i + 8].copy_from_slice(&v.to_le_bytes());
            format!("u64 at {i} set to {v:#x}")
        }
        3 if b.len() >= 4 => {
            let i = at(rng, 4).min(b.len() - 4);
            let v = EXTREMES[rng.below(EXTREMES.len() as u64) as usize] as u32;
            b[i..i + 4].copy_from_slice(&v.to_le_bytes());
            format!("u32 at {i} set to {v:#x}")
        }
        4 => {
            let n = rng.below(b.len() as u64) as usize;
            b.truncate(n);
            format!("cut to {n} bytes")
        }
        _ => {
            let mut d = vec![];
            for _ in 0..4 {
                let i = at(rng, 1);
                b[i] = rng.below(256) as u8;
                d.push(format!("{i}={:#04x}", b[i]));
            }
            format!("bytes {}", d.join(", "))
        }
    };
    (b, what)
}

/// Writes `trials` corruptions of `file` (restoring it afterwards) and runs `load` on each.
/// Fails on any panic, and on an error that does not name a file of `dir`.
/// `FUZZ_SCALE=N` runs N times the trials and `FUZZ_SEED=S` mixes S into every seed: a longer,
/// different campaign by hand (CI runs the defaults).
fn campaign() -> (usize, u64) {
    let num = |k: &str, default: u64| {
        std::env::var(k)
            .ok()
            .map(|v| {
                v.parse::<u64>()
                    .unwrap_or_else(|_| panic!("{k}={v}: not a number"))
            })
            .unwrap_or(default)
    };
    (num("FUZZ_SCALE", 1).max(1) as usize, num("FUZZ_SEED", 0))
}

fn fuzz(file: &Path, head: usize, trials: usize, seed: u64, load: impl Fn() -> Result<(), String>) {
    let good = std::fs::read(file).unwrap();
    let dir = file.parent().unwrap().display().to_string();
    let (scale, extra) = campaign();
    let trials = trials * scale;
    let seed = seed ^ extra.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut rng = Rng::new(seed);
    let (mut ok, mut err) = (0, 0);
    let mut panics = vec![];
    for _ in 0..trials {
        let (bytes, what) = corrupt(&good, head, &mut rng);
        std::fs::write(file, &bytes).unwrap();
        match catch_unwind(AssertUnwindSafe(&load)) {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                err += 1;
                if std::env::var("FUZZ_SHOW").is_ok() {
                    eprintln!("  {what}: {e}");
                }
                assert!(
                    e.contains(&dir),
                    "{}: {what}: the error names no file: {e}",
                    file.display()
                );
            }
            Err(_) => panics.push(what),
        }
    }
    std::fs::write(file, &good).unwrap();
    eprintln!(
        "{}: {trials} corruptions (seed {seed:#x}): {ok} loaded, {err} refused, {} panicked",
        file.display(),
        panics.len()
    );
    assert!(
        panics.is_empty(),
        "{}: reading panicked on {} of {trials} corruptions, e.g. {:?}",
        file.display(),
        panics.len(),
        &panics[..panics.len().min(5)]
    );
}

/// Open, read the tokenizer, and load into the CPU backend in int8.
fn load_model(path: &Path) -> Result<(), String> {
    let be = Cpu::new();
    let src = model::open(path).map_err(|e| e.to_string())?;
    src.tokenizer().map_err(|e| e.to_string())?;
    Llama::load(src.as_ref(), &be, LoadOptions::default())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The byte length of a safetensors file's header: its 8-byte length plus the JSON.
fn safetensors_head(path: &Path) -> usize {
    let b = std::fs::read(path).unwrap();
    8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize
}

#[test]
fn corrupted_gguf_never_panics() {
    let (_d, f) = fixture(&FixtureSpec::default());
    let head = GgufFile::open(&f.gguf).unwrap().data_start();
    fuzz(&f.gguf, head, 4000, 1, || load_model(&f.gguf));
}

#[test]
fn corrupted_hf_folder_never_panics() {
    let (_d, f) = fixture(&FixtureSpec::default());
    let st = f.hf_dir.join("model.safetensors");
    let head = safetensors_head(&st);
    fuzz(&st, head, 1000, 2, || load_model(&f.hf_dir));
    for (name, seed) in [("config.json", 3), ("tokenizer.json", 4)] {
        let p = f.hf_dir.join(name);
        let len = std::fs::metadata(&p).unwrap().len() as usize;
        fuzz(&p, len, 1000, seed, || load_model(&f.hf_dir));
    }
}

fn tiny_config() -> TrainConfig {
    let mut c = TrainConfig::preset("tallrec").unwrap();
    c.lora.r = 4;
    c.lora.targets = parse_targets("q,v,down").unwrap();
    c.warmup_steps = 1;
    c.steps = 4;
    c.batch_size = 2;
    c.grad_accum = 1;
    c.cutoff = 32;
    c
}

fn tiny_data(vocab: usize) -> Vec<Example> {
    let mut rng = Rng::new(5);
    (0..4)
        .map(|i| {
            let ids = (0..8 + i).map(|_| rng.below(vocab as u64) as u32).collect();
            Example::language_model(ids).unwrap()
        })
        .collect()
}

#[test]
fn corrupted_adapter_and_checkpoint_never_panic() {
    let (d, f) = fixture(&FixtureSpec::default());
    let be = Cpu::new();
    let src = model::open(&f.gguf).unwrap();
    let m = Llama::load(src.as_ref(), &be, LoadOptions::default()).unwrap();
    let data = tiny_data(m.config.vocab_size);
    let mut t = Trainer::new(&be, &m, tiny_config(), data.clone(), "fixture").unwrap();
    t.step().unwrap();
    let ck = d.path().join("ck");
    t.save_checkpoint(&ck).unwrap();

    // What `rec eval --adapter` does: load, check against the model, upload.
    let use_adapter = || -> Result<(), String> {
        let host = adapter::load(&ck).map_err(|e| e.to_string())?;
        host.check_against(&m.config).map_err(|e| e.to_string())?;
        DevAdapter::upload_frozen(&be, &host)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let resume = || {
        Trainer::resume(&be, &m, &ck, data.clone(), None)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let w = ck.join(adapter::WEIGHTS_FILE);
    fuzz(&w, safetensors_head(&w), 1000, 6, use_adapter);
    let c = ck.join(adapter::CONFIG_FILE);
    let len = std::fs::metadata(&c).unwrap().len() as usize;
    fuzz(&c, len, 1000, 7, use_adapter);
    let o = ck.join("optimizer.safetensors");
    fuzz(&o, safetensors_head(&o), 500, 8, resume);
    let s = ck.join("trainer_state.json");
    let len = std::fs::metadata(&s).unwrap().len() as usize;
    fuzz(&s, len, 1000, 9, resume);
}

/// The tokenizers crate panics (an `expect` in its decoder's deserializer) when the text
/// breaks off inside the decoder; recforge checks the JSON first and reports it.
#[test]
fn a_tokenizer_cut_inside_its_decoder_is_an_error() {
    let (_d, f) = fixture(&FixtureSpec::default());
    let p = f.hf_dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&p).unwrap();
    let at = text.find("\"decoder\"").expect("the fixture has a decoder") + 12;
    for cut in [at, at + 5, at + 20] {
        std::fs::write(&p, &text[..cut]).unwrap();
        let e = catch_unwind(|| load_model(&f.hf_dir))
            .unwrap_or_else(|_| panic!("cut at {cut}: loading panicked"))
            .expect_err("a cut tokenizer loaded");
        assert!(
            e.contains("tokenizer.json") && e.contains("invalid tokenizer: not valid JSON"),
            "cut at {cut}: {e}"
        );
    }
}

/// MovieLens atomic files (a slice of the real ones) and a TALLRec sample file: building the
/// samples from a corrupted dataset, or reading a corrupted sample file, never panics.
#[test]
fn corrupted_movielens_and_sample_files_never_panic() {
    use recforge::rec::tallrec;
    let Some(ml) = common::asset("assets/ml-100k") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("ml-100k");
    std::fs::create_dir(&dir).unwrap();
    // The first 3,000 interactions keep each trial quick; every item keeps its title.
    let inter = std::fs::read_to_string(ml.join("ml-100k.inter")).unwrap();
    let slice: Vec<&str> = inter.lines().take(3001).collect();
    std::fs::write(dir.join("ml-100k.inter"), slice.join("\n") + "\n").unwrap();
    std::fs::copy(ml.join("ml-100k.item"), dir.join("ml-100k.item")).unwrap();
    let samples = tallrec::build_kept(&dir).unwrap();
    assert!(!samples.is_empty());
    let build = || {
        tallrec::build_kept(&dir)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    for (name, seed) in [("ml-100k.inter", 10), ("ml-100k.item", 11)] {
        let p = dir.join(name);
        let len = std::fs::metadata(&p).unwrap().len() as usize;
        fuzz(&p, len, 300, seed, build);
    }
    let sp = d.path().join("train.json");
    tallrec::write_json(&sp, &samples[..50]).unwrap();
    let len = std::fs::metadata(&sp).unwrap().len() as usize;
    fuzz(&sp, len, 1000, 12, || {
        tallrec::read_json(&sp)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    // `rec prune --from-scores`: a scores file of those 50, every other sample scored.
    use recforge::rec::prune::{fingerprint, ScoredSample, ScoresFile};
    let kept = &samples[..50];
    let scores = ScoresFile {
        data: sp.display().to_string(),
        data_fingerprint: fingerprint(kept),
        data_samples: kept.len(),
        model: "m".into(),
        adapter: Some("a".into()),
        cutoff: 512,
        outlier_threshold: 6.0,
        selection: "stratified".into(),
        strata: Some(10),
        seed: 1,
        balance_labels: false,
        kept: 5,
        samples: (0..kept.len())
            .step_by(2)
            .map(|index| ScoredSample {
                index,
                tokens: 3 + index,
                loss: 0.5 + index as f64 / 7.0,
                grad_norm: 1.0 / (1.0 + index as f64),
                kept: index % 3 == 0,
            })
            .collect(),
    };
    let scp = d.path().join("scores.json");
    scores.write(&scp).unwrap();
    let len = std::fs::metadata(&scp).unwrap().len() as usize;
    fuzz(&scp, len, 1000, 13, || {
        ScoresFile::read(&scp, kept)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
}

/// llama.cpp's vocabulary-only GGUFs (SentencePiece and GPT-2 BPE): the tokenizer rebuilt from
/// corrupted metadata — token texts, scores, types, merges — either encodes a text or is
/// refused, never panics.
#[test]
fn corrupted_gguf_vocabularies_never_panic() {
    use recforge::model::tokenizer::from_gguf;
    for (name, seed) in [
        ("ggml-vocab-llama-spm.gguf", 13),
        ("ggml-vocab-gpt-2.gguf", 14),
    ] {
        let Some(src) = common::asset(&format!("assets/llama-vocab/{name}")) else {
            return;
        };
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(name);
        std::fs::copy(&src, &p).unwrap();
        let len = std::fs::metadata(&p).unwrap().len() as usize;
        fuzz(&p, len, 150, seed, || {
            let f = GgufFile::open(&p).map_err(|e| e.to_string())?;
            let tok = from_gguf(&f).map_err(|e| e.to_string())?;
            tok.encode(
                "Hello world, the movie \"Toy Story (1995)\" — 123 ünïcödé",
                true,
            )
            .map(|_| ())
            .map_err(|e| format!("{}: {e}", p.display()))
        });
    }
}
