//! recforge's tokenizers rebuilt from GGUF metadata against llama.cpp's own tokenizer tests:
//! llama.cpp ships vocabulary-only GGUF files with an input file of texts (separated by
//! `__ggml_vocab_test__` lines) and the ids its tokenizer gives each (one line per text, no
//! special tokens). scripts/fetch-assets.sh takes them from the pinned llama-cpp-python source
//! distribution into assets/llama-vocab/. Checked here: GPT-2 (pre-tokenizer "gpt-2"),
//! LLaMA 3 ("llama-bpe") and LLaMA 1/2's SentencePiece vocabulary (tokenizer model "llama").
//! The texts are llama.cpp's edge cases: whitespace runs, tabs and newlines, digits, emoji,
//! several scripts, apostrophes.
//!
//! Like tests/smollm2.rs, a missing asset fails under RECFORGE_REQUIRE_ASSETS=1 or CI and
//! otherwise skips with the reason.

mod common;

use std::path::PathBuf;

use recforge::backend::IGNORE_LABEL;
use recforge::model::gguf::GgufFile;
use recforge::model::tokenizer::from_gguf;

fn vocab(name: &str) -> Option<PathBuf> {
    common::asset(&format!("assets/llama-vocab/ggml-vocab-{name}.gguf"))
}

/// Every text of `<vocab>.inp` tokenized as llama.cpp does in `<vocab>.out`.
fn matches_llama_cpp(name: &str) {
    let Some(path) = vocab(name) else { return };
    let read = |ext: &str| {
        let p = format!("{}.{ext}", path.display());
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
    };
    let (inp, out) = (read("inp"), read("out"));
    // The input file ends with a separator, so the last piece is empty and has no output line.
    let mut texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    assert_eq!(
        texts.pop(),
        Some(""),
        "{name}: the input file's last separator"
    );
    let wants: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
        .collect();
    assert_eq!(texts.len(), wants.len(), "{name}: one output line per text");
    assert!(texts.len() > 40, "{name}: {} texts", texts.len());
    let tok = from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let mut differ = vec![];
    for (text, want) in texts.iter().zip(&wants) {
        let got = tok.encode(text, false).unwrap();
        if &got != want {
            differ.push(format!("{text:?}: recforge {got:?}, llama.cpp {want:?}"));
        }
    }
    assert!(
        differ.is_empty(),
        "{name}: {} of {} texts tokenize differently:\n{}",
        differ.len(),
        texts.len(),
        differ.join("\n")
    );
    eprintln!(
        "{name}: all {} of llama.cpp's test texts give its ids",
        texts.len()
    );
}

#[test]
fn gpt2_vocabulary_tokenizes_like_llama_cpp() {
    matches_llama_cpp("gpt-2");
}

#[test]
fn llama3_vocabulary_tokenizes_like_llama_cpp() {
    // Needs `ignore_merges`: " Việt" is one token of the vocabulary that the merges cannot
    // build (without it, 3 tokens; transformers' own GGUF loader gives those 3 as well).
    matches_llama_cpp("llama-bpe");
}

#[test]
fn llama2_sentencepiece_vocabulary_tokenizes_like_llama_cpp() {
    // GGUF keeps SentencePiece's scores, not merges: the merges are rebuilt from them.
    matches_llama_cpp("llama-spm");
}

#[test]
fn llama2_sentencepiece_round_trips_and_adds_bos() {
    let Some(path) = vocab("llama-spm") else {
        return;
    };
    let tok = from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    for text in [
        "Hello world",
        "  two leading spaces, a tab\tand\nnewlines\n\n",
        "Le café coûte 3,50 € — très cher! 日本語 🦙",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        // <s> (id 1) in front when special tokens are asked for, as the GGUF says.
        let with = tok.encode(text, true).unwrap();
        assert_eq!(with[0], 1);
        assert_eq!(&with[1..], &ids[..]);
    }
}

#[test]
fn tallrec_responses_continue_the_prompt_with_a_sentencepiece_vocabulary() {
    // TALLRec (alpaca-lora) tokenizes prompt + response as one text, so after the template's
    // closing newline the response starts with "Yes", not with the "▁Yes" that SentencePiece
    // gives the word on its own. Training's labels and scoring's Yes/No ids must both be the
    // former.
    use recforge::rec::eval::YesNo;
    use recforge::rec::prompt::prompt;
    use recforge::train::Example;
    let Some(path) = vocab("llama-spm") else {
        return;
    };
    let tok = from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let id = |t: &str| {
        tok.token_id(t)
            .unwrap_or_else(|| panic!("{t:?} is not a token"))
    };
    assert_eq!(
        tok.encode("Yes.", false).unwrap()[0],
        id("▁Yes"),
        "on its own"
    );

    let p = prompt("Will the user like it?", "User Preference: \"Heat (1995)\"");
    let e = Example::from_prompt_response(&tok, &p, "Yes.", 512)
        .unwrap()
        .unwrap();
    let prompt_ids = tok.encode(&p, true).unwrap();
    let joint = tok.encode(&format!("{p}Yes."), true).unwrap();
    assert_eq!(
        &e.ids[..joint.len()],
        &joint[..],
        "prompt + response as one text"
    );
    assert_eq!(e.ids[prompt_ids.len()], id("Yes"));
    // The first labelled row (the prompt's last token) predicts that token.
    let first = e.labels.iter().position(|&l| l != IGNORE_LABEL).unwrap();
    assert_eq!((first, e.labels[first]), (prompt_ids.len() - 1, id("Yes")));

    let yn = YesNo::from_tokenizer(&tok).unwrap();
    assert_eq!((yn.yes, yn.no), (id("Yes"), id("No")));
}
