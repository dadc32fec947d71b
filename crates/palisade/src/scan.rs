//! `palisade scan`: the inspection engine on a file or stdin, scoring on labelled corpora, and
//! training the classifier (with cross-validated figures).

use anyhow::{Context, Result, bail};
use clap::Args;
use palisade_inspect::eval::{self, Corpus, Counts, InjectionScores};
use palisade_inspect::{Detectors, Inspector, Severity};
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct ScanArgs {
    /// File to scan; `-` or nothing reads stdin.
    file: Option<PathBuf>,
    /// Output format: `text` or `json`.
    #[arg(long, default_value = "text")]
    format: String,
    /// Score the detectors on a labelled JSON-lines corpus (prompt-injection or DLP format).
    #[arg(long, value_name = "FILE.jsonl", conflicts_with_all = ["file", "train"])]
    eval: Option<PathBuf>,
    /// Train the classifier on a prompt-injection corpus and report k-fold cross-validated
    /// figures; writes the model to --out.
    #[arg(long, value_name = "CORPUS.jsonl", conflicts_with = "file")]
    train: Option<PathBuf>,
    /// Where --train writes the model.
    #[arg(long, requires = "train")]
    out: Option<PathBuf>,
    /// Folds for cross-validation (--train).
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Training epochs (--train).
    #[arg(long, default_value_t = 12)]
    epochs: usize,
    /// Classifier threshold for visible text, 0 to 1 (higher: fewer false alarms).
    #[arg(long, default_value_t = palisade_inspect::instruct::VISIBLE_THRESHOLD)]
    threshold: f32,
    /// Classifier threshold for hidden and decoded text, 0 to 1.
    #[arg(long, default_value_t = palisade_inspect::instruct::HIDDEN_THRESHOLD)]
    hidden_threshold: f32,
    /// A classifier model file instead of the built-in one.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Only the injection detectors.
    #[arg(long, conflicts_with = "dlp_only")]
    injection_only: bool,
    /// Only the DLP detectors.
    #[arg(long)]
    dlp_only: bool,
    /// With --eval: list the ids of missed and falsely flagged records.
    #[arg(long)]
    list_errors: bool,
}

/// Exit status: 0 clean, 1 findings of medium severity or more, 64 bad usage.
pub fn run(args: ScanArgs, json_flag: bool) -> Result<ExitCode> {
    let json = json_flag
        || match args.format.as_str() {
            "json" => true,
            "text" => false,
            other => bail!("--format `{other}` is not text or json"),
        };
    let key = random_key()?;
    let inspector = match &args.model {
        Some(path) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("cannot read the model {}", path.display()))?;
            let model = palisade_inspect::classifier::Model::from_bytes(&bytes)
                .with_context(|| format!("{}", path.display()))?;
            Inspector::with_model(key, model)
        }
        None => Inspector::new(key),
    };
    if !(0.0..=1.0).contains(&args.threshold) || !(0.0..=1.0).contains(&args.hidden_threshold) {
        bail!("--threshold and --hidden-threshold are between 0 and 1");
    }
    let inspector = inspector.with_thresholds(args.threshold, args.hidden_threshold);
    if let Some(corpus) = &args.train {
        return train(&args, corpus, key, json);
    }
    if let Some(corpus) = &args.eval {
        return evaluate(&inspector, corpus, json, args.list_errors);
    }
    let text = match args.file.as_deref() {
        None => read_stdin()?,
        Some(p) if p.as_os_str() == "-" => read_stdin()?,
        Some(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
            String::from_utf8_lossy(&bytes).into_owned()
        }
    };
    let detectors = Detectors {
        injection: !args.dlp_only,
        dlp: !args.injection_only,
    };
    let report = inspector.inspect(&text, detectors);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.findings.is_empty() {
        println!("no findings");
    } else {
        for f in &report.findings {
            let what = f.entity.unwrap_or(f.category.as_str());
            let revealed = f
                .revealed
                .as_deref()
                .map(|r| format!("  \"{}\"", r.replace('\n', " ")))
                .unwrap_or_default();
            println!(
                "{:>6}-{:<6} {:<7} {:<28} {:<22} {:.2}{revealed}",
                f.start,
                f.end,
                format!("{:?}", f.severity).to_lowercase(),
                f.detector,
                what,
                f.score
            );
        }
        if report.injection {
            println!(
                "prompt injection: yes (score {:.2})",
                report.injection_score
            );
        }
        if let Some(tier) = report.tier {
            println!("classification: at least {tier:?}");
        }
    }
    let serious = report
        .findings
        .iter()
        .any(|f| f.severity >= Severity::Medium);
    Ok(if serious {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn read_stdin() -> Result<String> {
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .context("cannot read stdin")?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn random_key() -> Result<[u8; 32]> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
    Ok(key)
}

fn load(corpus: &PathBuf) -> Result<Corpus> {
    let text = std::fs::read_to_string(corpus)
        .with_context(|| format!("cannot read {}", corpus.display()))?;
    eval::parse_corpus(&text).with_context(|| format!("{}", corpus.display()))
}

fn evaluate(inspector: &Inspector, corpus: &PathBuf, json: bool, list: bool) -> Result<ExitCode> {
    match load(corpus)? {
        Corpus::Injection(records) => {
            let scores = eval::eval_injection(inspector, &records);
            print_injection(&scores, json, &format!("{}", corpus.display()));
            if list {
                println!("missed: {}", scores.misses.join(" "));
                println!("false alarms: {}", scores.false_alarms.join(" "));
            }
        }
        Corpus::Dlp(records) => {
            let scores = eval::eval_dlp(inspector, &records);
            if json {
                println!("{}", serde_json::to_string_pretty(&scores)?);
            } else {
                println!(
                    "DLP corpus {} ({} records)",
                    corpus.display(),
                    records.len()
                );
                println!(
                    "{:<24} {:>6} {:>6} {:>8}",
                    "entity", "found", "all", "recall"
                );
                for (name, (found, all)) in &scores.per_type {
                    println!("{name:<24} {found:>6} {all:>6} {:>7.1}%", pct(*found, *all));
                }
                for (name, (found, all)) in &scores.per_category {
                    println!(
                        "category {name:<15} {found:>6} {all:>6} {:>7.1}%",
                        pct(*found, *all)
                    );
                }
                let spans = scores.true_spans + scores.false_spans;
                println!(
                    "reported spans: {spans}, precision {:.1}%; decoys reported: {} of {} ({:.1}%)",
                    pct(scores.true_spans, spans),
                    scores.decoys.0,
                    scores.decoys.1,
                    pct(scores.decoys.0, scores.decoys.1)
                );
            }
            if list {
                println!("missed: {}", scores.misses.join(" "));
                println!("false alarms: {}", scores.false_alarms.join(" "));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn pct(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        100.0 * a as f64 / b as f64
    }
}

fn print_injection(scores: &InjectionScores, json: bool, title: &str) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(scores).unwrap_or_default()
        );
        return;
    }
    let line = |name: &str, c: &Counts| {
        if c.tp + c.fn_ > 0 && c.fp + c.tn > 0 {
            println!(
                "{name:<24} precision {:>5.1}%  recall {:>5.1}%  F1 {:>5.1}%  FP rate {:>5.1}%  (tp {} fp {} fn {} tn {})",
                100.0 * c.precision(),
                100.0 * c.recall(),
                100.0 * c.f1(),
                100.0 * c.fp_rate(),
                c.tp,
                c.fp,
                c.fn_,
                c.tn
            );
        } else if c.tp + c.fn_ > 0 {
            println!(
                "{name:<24} recall {:>5.1}%  ({} of {})",
                100.0 * c.recall(),
                c.tp,
                c.tp + c.fn_
            );
        } else {
            println!(
                "{name:<24} false positives {:>5.1}%  ({} of {})",
                100.0 * c.fp_rate(),
                c.fp,
                c.fp + c.tn
            );
        }
    };
    println!("prompt-injection corpus {title}");
    line("all", &scores.overall);
    for (kind, c) in &scores.per_kind {
        line(&format!("kind {kind}"), c);
    }
    for (sub, c) in &scores.benign_subkind {
        line(&format!("  benign {sub}"), c);
    }
}

fn train(args: &ScanArgs, corpus: &PathBuf, key: [u8; 32], json: bool) -> Result<ExitCode> {
    let Corpus::Injection(records) = load(corpus)? else {
        bail!(
            "{} is a DLP corpus; the classifier trains on a prompt-injection corpus",
            corpus.display()
        );
    };
    if args.folds >= 2 {
        eprintln!(
            "cross-validating: {} folds over {} records ...",
            args.folds,
            records.len()
        );
        let scores = eval::cross_validate(
            key,
            &records,
            args.folds,
            args.epochs,
            (args.threshold, args.hidden_threshold),
        );
        print_injection(
            &scores,
            json,
            &format!(
                "{} ({}-fold cross-validation: each record scored by a model that never saw it)",
                corpus.display(),
                args.folds
            ),
        );
        if args.list_errors {
            println!("missed: {}", scores.misses.join(" "));
            println!("false alarms: {}", scores.false_alarms.join(" "));
        }
    }
    if let Some(out) = &args.out {
        let model = eval::train_model(&records, args.epochs);
        let tmp = out.with_extension("tmp");
        std::fs::write(&tmp, model.to_bytes())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, out)
            .with_context(|| format!("cannot move the model to {}", out.display()))?;
        eprintln!("model written to {}", out.display());
    }
    Ok(ExitCode::SUCCESS)
}
