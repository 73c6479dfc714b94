//! TALLRec's prompt: the Alpaca template.

use super::tallrec::Sample;

/// The Alpaca prompt for an instruction and its input, ending where the response begins.
///
/// An empty input gets Alpaca's no-input template (as TALLRec's `generate_prompt` does); TALLRec
/// samples always have an input.
pub fn prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    }
}

/// (prompt, response): the training text is their concatenation, and the loss is on the
/// response ("Yes." / "No.").
pub fn prompt_and_response(sample: &Sample) -> (String, String) {
    (
        prompt(&sample.instruction, &sample.input),
        sample.output.clone(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpaca_template_exactly() {
        let s = Sample {
            instruction: "Do X.".into(),
            input: "some input".into(),
            output: "Yes.".into(),
        };
        let (p, r) = prompt_and_response(&s);
        assert_eq!(
            p,
            "Below is an instruction that describes a task, paired with an input that provides \
             further context. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\nDo X.\n\n### Input:\nsome input\n\n### Response:\n"
        );
        assert_eq!(r, "Yes.");
        assert_eq!(
            prompt("Do X.", ""),
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\nDo X.\n\n### Response:\n"
        );
    }
}
