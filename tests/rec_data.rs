//! Recommendation data and metrics: TALLRec samples from MovieLens (a hand-made dataset whose
//! samples are written out here by hand, and the real ml-100k when it is present), the prompt,
//! and AUC / accuracy / log loss against hand-worked values and a brute-force reference.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use recforge::rec::metrics::{accuracy, auc, log_loss, Metrics};
use recforge::rec::tallrec::{self, Sample, Split, INSTRUCTION};
use recforge::rng::Rng;

// ---------------------------------------------------------------------------------------------
// Metrics

/// O(n²) reference: over all (positive, negative) pairs, 1 if the positive scores higher, 1/2 on
/// a tie.
fn brute_auc(scores: &[f64], labels: &[bool]) -> f64 {
    let (mut num, mut pairs) = (0.0, 0.0);
    for (i, &li) in labels.iter().enumerate() {
        for (j, &lj) in labels.iter().enumerate() {
            if li && !lj {
                pairs += 1.0;
                if scores[i] > scores[j] {
                    num += 1.0;
                } else if scores[i] == scores[j] {
                    num += 0.5;
                }
            }
        }
    }
    num / pairs
}

#[test]
fn auc_hand_worked() {
    let labels = [true, false, true, false, false];
    // Perfect and reversed rankings.
    assert_eq!(auc(&[0.9, 0.1, 0.8, 0.2, 0.3], &labels).unwrap(), 1.0);
    assert_eq!(auc(&[0.1, 0.9, 0.2, 0.8, 0.7], &labels).unwrap(), 0.0);
    // All tied.
    assert_eq!(auc(&[0.3; 5], &labels).unwrap(), 0.5);
    // Positives score 0.5 and 0.2; negatives 0.5, 0.2, 0.1. Pairs (6):
    //   0.5 vs 0.5 → 1/2, 0.5 vs 0.2 → 1, 0.5 vs 0.1 → 1,
    //   0.2 vs 0.5 → 0,   0.2 vs 0.2 → 1/2, 0.2 vs 0.1 → 1   ⇒ 4 / 6.
    let a = auc(&[0.5, 0.5, 0.2, 0.2, 0.1], &labels).unwrap();
    assert!((a - 4.0 / 6.0).abs() < 1e-15, "{a}");
    // One positive between two negatives: 1 of 2 pairs.
    assert_eq!(auc(&[1.0, 0.5, 0.0], &[false, true, false]).unwrap(), 0.5);
    // Scores need not be probabilities.
    assert_eq!(
        auc(
            &[-3.0, f64::INFINITY, f64::NEG_INFINITY],
            &[true, true, false]
        )
        .unwrap(),
        1.0
    );
}

#[test]
fn auc_matches_brute_force_with_many_ties() {
    let mut rng = Rng::new(2024);
    let mut checked = 0;
    for case in 0..300 {
        let n = 2 + rng.below(120) as usize;
        let levels = 1 + rng.below(if case % 2 == 0 { 4 } else { 50 });
        let scores: Vec<f64> = (0..n)
            .map(|_| rng.below(levels) as f64 / levels as f64)
            .collect();
        let p_pos = rng.uniform();
        let labels: Vec<bool> = (0..n).map(|_| rng.uniform() < p_pos).collect();
        let pos = labels.iter().filter(|&&l| l).count();
        if pos == 0 || pos == n {
            assert!(auc(&scores, &labels).is_err());
            continue;
        }
        let got = auc(&scores, &labels).unwrap();
        let want = brute_auc(&scores, &labels);
        assert!((got - want).abs() < 1e-12, "case {case}: {got} vs {want}");
        checked += 1;
    }
    assert!(checked > 200, "only {checked} cases had both classes");
}

#[test]
fn auc_errors() {
    assert!(auc(&[0.1, 0.2], &[true, true]).is_err());
    assert!(auc(&[0.1, 0.2], &[false, false]).is_err());
    assert!(auc(&[0.1, 0.2], &[true]).is_err());
    assert!(auc(&[], &[]).is_err());
    let e = auc(&[0.1, f64::NAN], &[true, false])
        .unwrap_err()
        .to_string();
    assert!(e.contains("NaN"), "{e}");
}

#[test]
fn metrics_summary() {
    let probs = [0.9, 0.4, 0.6, 0.2];
    let labels = [true, true, false, false];
    let m = Metrics::compute(&probs, &labels).unwrap();
    assert_eq!(m.n, 4);
    assert_eq!(m.positives, 2);
    // Pairs: 0.9>0.6, 0.9>0.2, 0.4<0.6, 0.4>0.2 → 3/4.
    assert_eq!(m.auc, Some(0.75));
    // 0.9→Yes ✓, 0.4→No ✗, 0.6→Yes ✗, 0.2→No ✓.
    assert_eq!(m.accuracy, 0.5);
    let want_ll = -(0.9f64.ln() + 0.4f64.ln() + 0.4f64.ln() + 0.8f64.ln()) / 4.0;
    assert!((m.log_loss - want_ll).abs() < 1e-12);
    let j = m.to_json();
    assert_eq!(j["n"], 4);
    assert_eq!(j["positives"], 2);
    assert_eq!(j["auc"], 0.75);
    assert_eq!(j["accuracy"], 0.5);
    assert!((j["log_loss"].as_f64().unwrap() - want_ll).abs() < 1e-12);
    // Threshold: exactly 0.5 is "Yes".
    assert_eq!(accuracy(&[0.5, 0.5], &[true, false]).unwrap(), 0.5);
    // Clamping keeps certainty-and-wrong finite: -ln(1e-7).
    let ll = log_loss(&[1.0], &[false]).unwrap();
    assert!((ll - 16.11809565095832).abs() < 1e-6, "{ll}");
    // One class only: no AUC (it ranks positives against negatives), the rest still defined.
    let one = Metrics::compute(&[0.5, 0.9], &[true, true]).unwrap();
    assert_eq!(
        (one.n, one.positives, one.auc, one.accuracy),
        (2, 2, None, 1.0)
    );
    assert!((one.log_loss + (0.5f64.ln() + 0.9f64.ln()) / 2.0).abs() < 1e-12);
    assert!(one.to_json()["auc"].is_null());
    assert_eq!(one.auc_text(), "n/a (every label is Yes)");
    let none = Metrics::compute(&[0.2], &[false]).unwrap();
    assert_eq!((none.auc, none.accuracy), (None, 1.0));
    assert_eq!(none.auc_text(), "n/a (every label is No)");
    assert!(Metrics::compute(&[0.5, 0.5], &[true]).is_err());
}

// ---------------------------------------------------------------------------------------------
// A hand-made dataset

const ITEM_FILE: &str = "\
class:token_seq\trelease_year:token\titem_id:token\tmovie_title:token_seq
Animation Comedy\t1995\t1\tToy Story
Action\t1995\t2\tGoldenEye
Thriller\t1995\t3\tFour Rooms
Action Comedy\t1995\t4\tGet Shorty
Crime\t1995\t5\tCopycat
Crime Thriller\t1995\t6\tUsual Suspects, The
Sci-Fi\t1995\t7\tTwelve Monkeys
Children's\t1995\t8\tBabe
Drama\t1995\t9\tDead Man Walking
Drama War\t1995\t10\tRichard III
unknown\tunkonwn\t11\tunkonwn
Crime Thriller\t1995\t12\tSeven (Se7en)
Drama Romance\t1994\t13\tPostino, Il
";

/// (user, item, rating, timestamp) rows, in file order. User 5 has 12 interactions, given out of
/// timestamp order, with items 9 and 8 tied at t = 800 (9 first in the file); users 9 and 10
/// have 11 (one sample each; 10 > 9 numerically but not as strings); user 7 has 10 (none).
fn inter_rows() -> Vec<(u32, u32, &'static str, u32)> {
    let mut rows = vec![
        (5, 12, "3", 1100),
        (5, 4, "1", 400),
        (5, 1, "5", 100),
        (5, 11, "4", 1000),
        (5, 9, "4", 800),
        (5, 3, "3.5", 300),
        (5, 7, "2", 700),
        (5, 2, "3", 200),
        (5, 6, "5", 600),
        (5, 8, "5", 800),
        (5, 10, "3", 900),
        (5, 5, "4", 500),
    ];
    for k in 1..=10 {
        rows.push((10, k, "1", 10 + k));
        rows.push((9, k, "5", 10 + k));
        rows.push((7, k, "5", 10 + k));
    }
    rows.push((10, 6, "5", 50));
    rows.push((9, 13, "1", 50));
    rows
}

fn write_dataset(root: &Path, inter: &str, item: &str) -> PathBuf {
    let dir = root.join("toy");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("toy.inter"), inter).unwrap();
    std::fs::write(dir.join("toy.item"), item).unwrap();
    dir
}

fn toy_inter() -> String {
    // Columns in a non-standard order, plus one the reader must ignore.
    let mut s =
        String::from("rating:float\ttimestamp:float\textra:token\titem_id:token\tuser_id:token\n");
    for (u, i, r, t) in inter_rows() {
        s.push_str(&format!("{r}\t{t}\tx\t{i}\t{u}\n"));
    }
    s
}

#[test]
fn toy_dataset_samples_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_dataset(tmp.path(), &toy_inter(), ITEM_FILE);
    let kept = tallrec::build_kept(&dir).unwrap();
    let want: Vec<(&str, &str)> = vec![
        (
            "User Preference: \"Toy Story (1995)\", \"Four Rooms (1995)\", \"Copycat (1995)\", \
             \"Usual Suspects, The (1995)\", \"Dead Man Walking (1995)\", \"Babe (1995)\"\n\
             User Unpreference: \"GoldenEye (1995)\", \"Get Shorty (1995)\", \
             \"Twelve Monkeys (1995)\", \"Richard III (1995)\"\n\
             Whether the user will like the target movie \"unknown\"?",
            "Yes.",
        ),
        (
            "User Preference: \"Four Rooms (1995)\", \"Copycat (1995)\", \
             \"Usual Suspects, The (1995)\", \"Dead Man Walking (1995)\", \"Babe (1995)\", \
             \"unknown\"\n\
             User Unpreference: \"GoldenEye (1995)\", \"Get Shorty (1995)\", \
             \"Twelve Monkeys (1995)\", \"Richard III (1995)\"\n\
             Whether the user will like the target movie \"Seven (Se7en) (1995)\"?",
            "No.",
        ),
        (
            "User Preference: \"Toy Story (1995)\", \"GoldenEye (1995)\", \"Four Rooms (1995)\", \
             \"Get Shorty (1995)\", \"Copycat (1995)\", \"Usual Suspects, The (1995)\", \
             \"Twelve Monkeys (1995)\", \"Babe (1995)\", \"Dead Man Walking (1995)\", \
             \"Richard III (1995)\"\n\
             User Unpreference: \n\
             Whether the user will like the target movie \"Postino, Il (1994)\"?",
            "No.",
        ),
        (
            "User Preference: \n\
             User Unpreference: \"Toy Story (1995)\", \"GoldenEye (1995)\", \"Four Rooms (1995)\", \
             \"Get Shorty (1995)\", \"Copycat (1995)\", \"Usual Suspects, The (1995)\", \
             \"Twelve Monkeys (1995)\", \"Babe (1995)\", \"Dead Man Walking (1995)\", \
             \"Richard III (1995)\"\n\
             Whether the user will like the target movie \"Usual Suspects, The (1995)\"?",
            "Yes.",
        ),
    ];
    assert_eq!(kept.len(), want.len(), "{kept:#?}");
    for (k, (s, (input, output))) in kept.iter().zip(&want).enumerate() {
        assert_eq!(s.input, *input, "sample {k}");
        assert_eq!(s.output, *output, "sample {k}");
        assert_eq!(
            s.instruction,
            "Given the user's preference and unpreference, identify whether the user will like \
             the target movie by answering \"Yes.\" or \"No.\"."
        );
    }
    assert_eq!(kept[0].label(), Some(true));
    assert_eq!(kept[1].label(), Some(false));

    // 4 samples: train [0, 3), valid [3, 3), test [3, 4).
    let train = tallrec::build(&dir, Split::Train).unwrap();
    let valid = tallrec::build(&dir, Split::Valid).unwrap();
    let test = tallrec::build(&dir, "test".parse().unwrap()).unwrap();
    assert_eq!((train.len(), valid.len(), test.len()), (3, 0, 1));
    assert_eq!(train[..], kept[..3]);
    assert_eq!(test[0], kept[3]);
}

#[test]
fn users_with_ten_or_fewer_interactions_give_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut inter = String::from("user_id:token\titem_id:token\trating:float\ttimestamp:float\n");
    for k in 1..=10 {
        inter.push_str(&format!("1\t{k}\t5\t{k}\n"));
    }
    let dir = write_dataset(tmp.path(), &inter, ITEM_FILE);
    let e = tallrec::build(&dir, Split::Train).unwrap_err().to_string();
    assert!(e.contains("toy.inter") && e.contains("no samples"), "{e}");
    // One more interaction → exactly one sample.
    inter.push_str("1\t11\t2\t11\n");
    std::fs::write(dir.join("toy.inter"), &inter).unwrap();
    let kept = tallrec::build_kept(&dir).unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].output, "No.");
    assert!(kept[0].input.ends_with("the target movie \"unknown\"?"));
}

#[test]
fn json_round_trip_and_bad_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_dataset(tmp.path(), &toy_inter(), ITEM_FILE);
    let kept = tallrec::build_kept(&dir).unwrap();
    let p = tmp.path().join("train.json");
    tallrec::write_json(&p, &kept).unwrap();
    assert_eq!(tallrec::read_json(&p).unwrap(), kept);
    // The file is TALLRec's format: a list of objects with exactly these three string fields.
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), kept.len());
    for (o, s) in list.iter().zip(&kept) {
        let o = o.as_object().unwrap();
        assert_eq!(o.len(), 3);
        assert_eq!(o["instruction"], INSTRUCTION);
        assert_eq!(o["input"], s.input.as_str());
        assert_eq!(o["output"], s.output.as_str());
    }
    // No temporary file left behind.
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    let bad = |text: &str, want: &str| {
        let q = tmp.path().join("bad.json");
        std::fs::write(&q, text).unwrap();
        let e = tallrec::read_json(&q).unwrap_err().to_string();
        assert!(e.contains("bad.json") && e.contains(want), "{text}: {e}");
    };
    bad(
        r#"{"instruction": "a", "input": "b", "output": "c"}"#,
        "list",
    );
    bad(r#"[{"instruction": "a", "output": "c"}]"#, "input");
    bad(
        r#"[{"instruction": "a", "input": 3, "output": "c"}]"#,
        "not a string",
    );
    bad(r#"[1]"#, "not an object");
    bad(r#"[{"instruction": "a", "#, "JSON");
    let e = tallrec::read_json(&tmp.path().join("missing.json")).unwrap_err();
    assert!(e.to_string().contains("missing.json"));
}

#[test]
fn bad_inter_files_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let good = toy_inter();
    let cases: Vec<(String, &str)> = vec![
        // Cut in the middle of a line.
        (good[..good.len() - 7].to_string(), "line 45"),
        // Missing column.
        (good.replace("timestamp:float", "time:float"), "timestamp"),
        // Bad numbers.
        (good.replacen("\t1100\t", "\t11o0\t", 1), "line 2"),
        (good.replacen("3.5\t", "x\t", 1), "line 7"),
        // Non-numeric user.
        (
            good.replacen("\tx\t12\t5\n", "\tx\t12\tfive\n", 1),
            "line 2",
        ),
        // Header only / empty.
        (
            good.lines().next().unwrap().to_string() + "\n",
            "no interactions",
        ),
        (String::new(), "header"),
    ];
    for (inter, want) in cases {
        let dir = write_dataset(tmp.path(), &inter, ITEM_FILE);
        let e = tallrec::build(&dir, Split::Train).unwrap_err().to_string();
        assert!(
            e.contains("toy.inter") && e.contains(want),
            "want {want:?}: {e}"
        );
    }
    // An item that the .item file does not have.
    let dir = write_dataset(tmp.path(), &good, &ITEM_FILE.replace("\t12\t", "\t99\t"));
    let e = tallrec::build(&dir, Split::Train).unwrap_err().to_string();
    assert!(e.contains("toy.item") && e.contains("\"12\""), "{e}");
    // A .item file missing its title column.
    let dir = write_dataset(tmp.path(), &good, &ITEM_FILE.replace("movie_title", "name"));
    let e = tallrec::build(&dir, Split::Train).unwrap_err().to_string();
    assert!(e.contains("toy.item") && e.contains("movie_title"), "{e}");
    // No dataset at all.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = tallrec::build(&empty, Split::Train)
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty") && e.contains(".inter"), "{e}");
}

#[test]
fn few_shot_sampling() {
    let v: Vec<Sample> = (0..100)
        .map(|k| Sample {
            instruction: INSTRUCTION.into(),
            input: k.to_string(),
            output: "Yes.".into(),
        })
        .collect();
    let a = tallrec::sample(&v, 16, 1).unwrap();
    assert_eq!(a, tallrec::sample(&v, 16, 1).unwrap());
    assert_ne!(a, tallrec::sample(&v, 16, 2).unwrap());
    let distinct: HashSet<&str> = a.iter().map(|s| s.input.as_str()).collect();
    assert_eq!(distinct.len(), 16);
    assert!(tallrec::sample(&v, 101, 1)
        .unwrap_err()
        .to_string()
        .contains("101"));
    assert!(tallrec::sample(&v, 0, 1).is_err());
    assert_eq!(tallrec::sample(&v, 100, 3).unwrap().len(), 100);
}

// ---------------------------------------------------------------------------------------------
// The real ml-100k

fn assets() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/ml-100k");
    if dir.join("ml-100k.inter").is_file() && dir.join("ml-100k.item").is_file() {
        return Some(dir);
    }
    if std::env::var("RECFORGE_REQUIRE_ASSETS").as_deref() == Ok("1") {
        panic!(
            "{} is missing and RECFORGE_REQUIRE_ASSETS=1 (run scripts/fetch-assets.sh)",
            dir.display()
        );
    }
    eprintln!(
        "skipped: {} is missing (run scripts/fetch-assets.sh)",
        dir.display()
    );
    None
}

/// The titles of a quoted, ", "-joined list (titles hold no double quote: checked by the caller).
fn quoted_titles(list: &str) -> Vec<&str> {
    if list.is_empty() {
        return Vec::new();
    }
    assert!(list.starts_with('"') && list.ends_with('"'), "{list:?}");
    list[1..list.len() - 1].split("\", \"").collect()
}

/// (liked, disliked, target) of an input text.
fn parse_input(input: &str) -> (Vec<&str>, Vec<&str>, &str) {
    let rest = input.strip_prefix("User Preference: ").expect(input);
    let (liked, rest) = rest.split_once("\nUser Unpreference: ").expect(input);
    let (disliked, target) = rest
        .split_once("\nWhether the user will like the target movie \"")
        .expect(input);
    let target = target.strip_suffix("\"?").expect(input);
    (quoted_titles(liked), quoted_titles(disliked), target)
}

/// The u.item titles, derived here independently: "{title} ({year})", and "unknown" for
/// RecBole's `unkonwn` row.
fn known_titles(dir: &Path) -> HashSet<String> {
    let text = std::fs::read_to_string(dir.join("ml-100k.item")).unwrap();
    text.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert!(!f[1].contains('"'), "a title with a quote: {l}");
            if f[1] == "unkonwn" {
                "unknown".to_string()
            } else {
                format!("{} ({})", f[1], f[2])
            }
        })
        .collect()
}

#[test]
fn ml100k_splits() {
    let Some(dir) = assets() else { return };
    let kept = tallrec::build_kept(&dir).unwrap();
    let splits: Vec<Vec<Sample>> = Split::ALL
        .iter()
        .map(|&s| tallrec::build(&dir, s).unwrap())
        .collect();
    assert_eq!(
        splits.iter().map(Vec::len).collect::<Vec<_>>(),
        [8000, 1000, 1000]
    );
    assert_eq!(kept.len(), 10_000);
    assert_eq!(splits.concat(), kept);

    let titles = known_titles(&dir);
    assert!(titles.contains("Usual Suspects, The (1995)"));
    assert!(titles.contains("unknown"));
    let mut yes = 0;
    for s in &kept {
        assert_eq!(s.instruction, INSTRUCTION);
        assert!(s.output == "Yes." || s.output == "No.", "{:?}", s.output);
        yes += (s.output == "Yes.") as usize;
        let (liked, disliked, target) = parse_input(&s.input);
        assert_eq!(liked.len() + disliked.len(), 10, "{}", s.input);
        for t in liked.iter().chain(&disliked).chain([&target]) {
            assert!(titles.contains(*t), "unknown title {t:?} in {}", s.input);
        }
    }
    let frac = yes as f64 / kept.len() as f64;
    eprintln!(
        "ml-100k: {yes} of {} kept samples are \"Yes.\" ({frac:.4})",
        kept.len()
    );
    assert!((0.4..=0.7).contains(&frac), "{frac}");

    // The very last sample: user 943's latest interaction (the last such row in the file on a
    // timestamp tie), derived here from the raw file.
    let inter = std::fs::read_to_string(dir.join("ml-100k.inter")).unwrap();
    let mut last: Option<(f64, &str, f64)> = None;
    for l in inter.lines().skip(1) {
        let f: Vec<&str> = l.split('\t').collect();
        if f[0] == "943" {
            let t: f64 = f[3].parse().unwrap();
            if last.is_none_or(|(lt, _, _)| t >= lt) {
                last = Some((t, f[1], f[2].parse().unwrap()));
            }
        }
    }
    let (_, item, rating) = last.unwrap();
    let item_line = std::fs::read_to_string(dir.join("ml-100k.item"))
        .unwrap()
        .lines()
        .find(|l| l.split('\t').next() == Some(item))
        .unwrap()
        .to_string();
    let f: Vec<&str> = item_line.split('\t').collect();
    let s = kept.last().unwrap();
    assert_eq!(parse_input(&s.input).2, format!("{} ({})", f[1], f[2]));
    assert_eq!(s.output, if rating > 3.0 { "Yes." } else { "No." });
}

#[test]
fn ml100k_few_shot_and_json() {
    let Some(dir) = assets() else { return };
    let train = tallrec::build(&dir, Split::Train).unwrap();
    let a = tallrec::sample(&train, 64, 42).unwrap();
    assert_eq!(a.len(), 64);
    assert_eq!(a, tallrec::sample(&train, 64, 42).unwrap());
    assert_ne!(a, tallrec::sample(&train, 64, 43).unwrap());
    assert!(a.iter().all(|s| train.contains(s)));
    assert!(tallrec::sample(&train, 8001, 42).is_err());

    let tmp = tempfile::tempdir().unwrap();
    for (name, v) in [("train.json", &train), ("shots.json", &a)] {
        let p = tmp.path().join(name);
        tallrec::write_json(&p, v).unwrap();
        assert_eq!(&tallrec::read_json(&p).unwrap(), v);
    }
}
