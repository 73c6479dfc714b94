//! recforge's dequantization of ggml block types (`model::gguf::dequantize`) against gguf-py's,
//! llama.cpp's own Python reader, which shares no code with it. `tests/data/ggml_quants.json`
//! was written by `scripts/ggml_quants_reference.py`: seeded random blocks (f16 scale fields
//! set to finite values) of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the k-quants Q2_K … Q6_K — what
//! llama.cpp's Q2_K, Q3_K_*, Q4_K_*, Q5_K_* and Q6_K files are made of — and gguf-py's f32
//! values for them.
//! Random bytes reach every bit of every field: each scale, min and high-bit pattern.

use recforge::model::gguf::{dequantize, GgmlType};
use serde_json::Value;

#[test]
fn dequantization_matches_gguf_py() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/ggml_quants.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let reference: Value = serde_json::from_str(&text).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 10);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let ty = GgmlType::from_id(c["type"].as_u64().unwrap() as u32)
            .unwrap_or_else(|| panic!("{name} is not a known ggml type"));
        assert_eq!(ty.name(), name);
        assert_eq!(
            ty.block(),
            (
                c["block_elements"].as_u64().unwrap() as usize,
                c["block_bytes"].as_u64().unwrap() as usize
            ),
            "{name}: block geometry"
        );
        let hex = c["bytes"].as_str().unwrap();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let want: Vec<f32> = c["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let got = dequantize(ty, &bytes);
        assert_eq!(got.len(), want.len(), "{name}: element count");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // Both compute in f32 with the same operations in the same order.
            assert!(
                g.to_bits() == w.to_bits(),
                "{name}: element {i} (block {}, offset {}): {g} vs gguf-py's {w}",
                i / ty.block().0,
                i % ty.block().0
            );
        }
    }
}
