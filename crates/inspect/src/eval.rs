//! Scoring the inspectors on labelled corpora (the JSON-lines format of `shared/eval`), and
//! training the classifier with honest, cross-validated figures.
//!
//! - Injection corpora (`label`, `kind`): a record is flagged when its report has an
//!   injection finding. Precision, recall and F1 overall and per kind; for benign records the
//!   false-positive rate, overall and per `meta.subkind`.
//! - DLP corpora (`entities`, `decoys`): an entity counts as found when a reported span of the
//!   same category overlaps it; a reported span over a decoy, or in a record without entities,
//!   is a false positive. Recall per entity type; the share of decoys reported.
//!
//! [`cross_validate`] trains on k-1 folds and scores the whole pipeline on the held-out fold,
//! so the classifier is never scored on rows it was trained on.

use crate::classifier::{Example, Model, train};
use crate::{Category, Detectors, Inspector};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One record of an injection corpus.
#[derive(Debug, Clone, Deserialize)]
pub struct InjectionRecord {
    /// Record id.
    #[serde(default)]
    pub id: String,
    /// The text.
    pub text: String,
    /// 1 for an injection.
    pub label: u8,
    /// `direct`, `indirect`, `encoded`, `hidden-unicode`, `html-hidden`, `jailbreak`, `benign`.
    #[serde(default)]
    pub kind: String,
    /// Technique, payload, subkind.
    #[serde(default)]
    pub meta: serde_json::Value,
}

/// One labelled span of a DLP corpus.
#[derive(Debug, Clone, Deserialize)]
pub struct Span {
    /// Start, in UTF-8 bytes.
    pub bstart: usize,
    /// End, in UTF-8 bytes.
    pub bend: usize,
    /// Entity type.
    #[serde(rename = "type")]
    pub kind: String,
    /// `pii`, `secret` or `exfil-indicator` (entities only).
    #[serde(default)]
    pub category: String,
}

/// One record of a DLP corpus.
#[derive(Debug, Clone, Deserialize)]
pub struct DlpRecord {
    /// Record id.
    #[serde(default)]
    pub id: String,
    /// The text.
    pub text: String,
    /// Sensitive entities.
    #[serde(default)]
    pub entities: Vec<Span>,
    /// Look-alikes that must not be reported.
    #[serde(default)]
    pub decoys: Vec<Span>,
}

/// Which corpus a file is.
pub enum Corpus {
    /// Prompt injection.
    Injection(Vec<InjectionRecord>),
    /// Data-loss prevention.
    Dlp(Vec<DlpRecord>),
}

/// Why a corpus could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    /// A line is not a record.
    #[error("line {line}: {message}")]
    Line {
        /// 1-based.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Nothing in it.
    #[error("the corpus has no records")]
    Empty,
}

/// Parses a JSON-lines corpus; the first record decides the kind (DLP records have
/// `entities`).
pub fn parse_corpus(text: &str) -> Result<Corpus, CorpusError> {
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l))
        .collect();
    let Some((_, first)) = lines.first() else {
        return Err(CorpusError::Empty);
    };
    let first: serde_json::Value = serde_json::from_str(first).map_err(|e| CorpusError::Line {
        line: 1,
        message: format!("not JSON: {e}"),
    })?;
    let dlp = first.get("entities").is_some();
    let bad = |line: usize, e: serde_json::Error| CorpusError::Line {
        line,
        message: format!(
            "not a {} record: {e}",
            if dlp { "DLP" } else { "prompt-injection" }
        ),
    };
    if dlp {
        lines
            .iter()
            .map(|(n, l)| serde_json::from_str(l).map_err(|e| bad(*n, e)))
            .collect::<Result<_, _>>()
            .map(Corpus::Dlp)
    } else {
        lines
            .iter()
            .map(|(n, l)| serde_json::from_str(l).map_err(|e| bad(*n, e)))
            .collect::<Result<_, _>>()
            .map(Corpus::Injection)
    }
}

/// Confusion counts.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq)]
pub struct Counts {
    /// True positives.
    pub tp: usize,
    /// False positives.
    pub fp: usize,
    /// False negatives.
    pub fn_: usize,
    /// True negatives.
    pub tn: usize,
}

impl Counts {
    /// tp / (tp + fp).
    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }
    /// tp / (tp + fn).
    pub fn recall(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }
    /// Harmonic mean of precision and recall.
    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }
    /// fp / (fp + tn).
    pub fn fp_rate(&self) -> f64 {
        ratio(self.fp, self.fp + self.tn)
    }
    fn add(&mut self, other: Counts) {
        self.tp += other.tp;
        self.fp += other.fp;
        self.fn_ += other.fn_;
        self.tn += other.tn;
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// Injection scores.
#[derive(Debug, Default, Clone, Serialize)]
pub struct InjectionScores {
    /// All records.
    pub overall: Counts,
    /// Per `kind` (positives only have tp/fn; `benign` only fp/tn).
    pub per_kind: BTreeMap<String, Counts>,
    /// Benign records per `meta.subkind`.
    pub benign_subkind: BTreeMap<String, Counts>,
    /// Ids of missed injections and false alarms (for tuning).
    #[serde(skip)]
    pub misses: Vec<String>,
    /// Ids of false alarms.
    #[serde(skip)]
    pub false_alarms: Vec<String>,
}

impl InjectionScores {
    fn merge(&mut self, other: InjectionScores) {
        self.overall.add(other.overall);
        for (k, v) in other.per_kind {
            self.per_kind.entry(k).or_default().add(v);
        }
        for (k, v) in other.benign_subkind {
            self.benign_subkind.entry(k).or_default().add(v);
        }
        self.misses.extend(other.misses);
        self.false_alarms.extend(other.false_alarms);
    }
}

/// Scores `inspector` on injection records.
pub fn eval_injection(inspector: &Inspector, records: &[InjectionRecord]) -> InjectionScores {
    let mut s = InjectionScores::default();
    let detectors = Detectors {
        injection: true,
        dlp: false,
    };
    for r in records {
        let flagged = inspector.inspect(&r.text, detectors).injection;
        let c = match (r.label == 1, flagged) {
            (true, true) => Counts {
                tp: 1,
                ..Counts::default()
            },
            (true, false) => {
                s.misses.push(r.id.clone());
                Counts {
                    fn_: 1,
                    ..Counts::default()
                }
            }
            (false, true) => {
                s.false_alarms.push(r.id.clone());
                Counts {
                    fp: 1,
                    ..Counts::default()
                }
            }
            (false, false) => Counts {
                tn: 1,
                ..Counts::default()
            },
        };
        s.overall.add(c);
        s.per_kind.entry(r.kind.clone()).or_default().add(c);
        if r.label == 0 {
            let sub = r
                .meta
                .get("subkind")
                .and_then(|v| v.as_str())
                .unwrap_or("other")
                .to_string();
            s.benign_subkind.entry(sub).or_default().add(c);
        }
    }
    s
}

/// DLP scores.
#[derive(Debug, Default, Clone, Serialize)]
pub struct DlpScores {
    /// Entities found / all, per type.
    pub per_type: BTreeMap<String, (usize, usize)>,
    /// Per category (`pii`, `secret`, `exfil-indicator`): entities found / all.
    pub per_category: BTreeMap<String, (usize, usize)>,
    /// Reported spans that hit an entity of their category.
    pub true_spans: usize,
    /// Reported spans over decoys or in records without entities, or of the wrong category.
    pub false_spans: usize,
    /// Decoys reported / all decoys.
    pub decoys: (usize, usize),
    /// Ids with a missed entity.
    #[serde(skip)]
    pub misses: Vec<String>,
    /// Ids with a false span.
    #[serde(skip)]
    pub false_alarms: Vec<String>,
}

fn category_name(c: Category) -> &'static str {
    match c {
        Category::Pii => "pii",
        Category::Secret => "secret",
        Category::ExfilIndicator => "exfil-indicator",
        Category::Injection => "injection",
        Category::Hidden => "hidden",
    }
}

/// Scores `inspector` on DLP records.
pub fn eval_dlp(inspector: &Inspector, records: &[DlpRecord]) -> DlpScores {
    let mut s = DlpScores::default();
    let detectors = Detectors {
        injection: false,
        dlp: true,
    };
    for r in records {
        let report = inspector.inspect(&r.text, detectors);
        let spans: Vec<(usize, usize, &str)> = report
            .findings
            .iter()
            .filter(|f| {
                matches!(
                    f.category,
                    Category::Pii | Category::Secret | Category::ExfilIndicator
                )
            })
            .map(|f| (f.start, f.end, category_name(f.category)))
            .collect();
        let overlaps = |a: (usize, usize), b: (usize, usize)| a.0 < b.1 && b.0 < a.1;
        let mut missed = false;
        for e in &r.entities {
            let found = spans.iter().any(|(st, en, cat)| {
                *cat == e.category && overlaps((*st, *en), (e.bstart, e.bend))
            });
            let t = s.per_type.entry(e.kind.clone()).or_default();
            t.1 += 1;
            let c = s.per_category.entry(e.category.clone()).or_default();
            c.1 += 1;
            if found {
                t.0 += 1;
                c.0 += 1;
            } else {
                missed = true;
            }
        }
        if missed {
            s.misses.push(r.id.clone());
        }
        let mut false_here = false;
        for (st, en, cat) in &spans {
            let hits = r
                .entities
                .iter()
                .any(|e| e.category == *cat && overlaps((*st, *en), (e.bstart, e.bend)));
            if hits {
                s.true_spans += 1;
            } else {
                s.false_spans += 1;
                false_here = true;
            }
        }
        if false_here {
            s.false_alarms.push(r.id.clone());
        }
        for d in &r.decoys {
            s.decoys.1 += 1;
            if spans
                .iter()
                .any(|(st, en, _)| overlaps((*st, *en), (d.bstart, d.bend)))
            {
                s.decoys.0 += 1;
            }
        }
    }
    s
}

/// The training rows of a record: the text itself, or for hidden and encoded injections the
/// plain payload (the detectors reveal it; the classifier judges what they reveal). The
/// visible text of HTML pages is a negative example either way.
pub fn training_examples(records: &[InjectionRecord]) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    // The judge also scores single lines, so lines of benign text are negatives too.
    let lines_of = |text: &str, out: &mut Vec<(String, bool)>| {
        for line in text.lines() {
            let line = line.trim();
            if line.len() >= 20 && line.len() < text.trim().len() {
                out.push((line.to_string(), false));
            }
        }
    };
    for r in records {
        let positive = r.label == 1;
        let hidden_kind = matches!(
            r.kind.as_str(),
            "encoded" | "hidden-unicode" | "html-hidden"
        );
        let inserted = r
            .meta
            .get("attack")
            .and_then(|v| v.as_str())
            .filter(|a| !a.is_empty() && r.text.contains(*a));
        if positive && r.kind == "indirect" && inserted.is_some() {
            // An instruction inserted into an ordinary document: the instruction is the
            // positive, the document around it a negative.
            let attack = inserted.unwrap_or_default();
            out.push((attack.to_string(), true));
            let carrier = r.text.replace(attack, "");
            lines_of(&carrier, &mut out);
            out.push((carrier, false));
            continue;
        }
        if !positive && !crate::html::looks_like_html(&r.text) {
            lines_of(&r.text, &mut out);
        }
        if positive && hidden_kind {
            if let Some(p) = r
                .meta
                .get("payload")
                .or_else(|| r.meta.get("attack"))
                .and_then(|v| v.as_str())
            {
                out.push((p.to_string(), true));
            }
        } else if crate::html::looks_like_html(&r.text) {
            let doc = crate::html::parse(&r.text);
            out.push((doc.visible, positive));
            if !positive {
                for seg in doc.segments {
                    out.push((seg.text, false));
                }
            }
        } else {
            out.push((r.text.clone(), positive));
        }
        if positive && r.kind == "html-hidden" && crate::html::looks_like_html(&r.text) {
            // The page around a hidden payload is an ordinary page.
            out.push((crate::html::parse(&r.text).visible, false));
        }
    }
    out
}

/// Trains a model on `records`.
pub fn train_model(records: &[InjectionRecord], epochs: usize) -> Model {
    // The judge scores normalised text; the model learns on the same form.
    let rows: Vec<(String, bool)> = training_examples(records)
        .into_iter()
        .map(|(t, p)| (crate::instruct::normalize(&t), p))
        .collect();
    let examples: Vec<Example<'_>> = rows
        .iter()
        .map(|(t, p)| Example {
            text: t,
            positive: *p,
        })
        .collect();
    train(&examples, epochs)
}

/// k-fold cross-validation of the whole pipeline: for each fold, a model trained on the other
/// folds inspects the fold's records. Folds are assigned by record position (round-robin), so
/// every kind is spread over all folds.
pub fn cross_validate(
    key: [u8; 32],
    records: &[InjectionRecord],
    folds: usize,
    epochs: usize,
    thresholds: (f32, f32),
) -> InjectionScores {
    let folds = folds.max(2);
    let mut total = InjectionScores::default();
    for k in 0..folds {
        let train_rows: Vec<InjectionRecord> = records
            .iter()
            .enumerate()
            .filter(|(i, _)| i % folds != k)
            .map(|(_, r)| r.clone())
            .collect();
        let test_rows: Vec<InjectionRecord> = records
            .iter()
            .enumerate()
            .filter(|(i, _)| i % folds == k)
            .map(|(_, r)| r.clone())
            .collect();
        let model = train_model(&train_rows, epochs);
        let inspector =
            Inspector::with_model(key, model).with_thresholds(thresholds.0, thresholds.1);
        total.merge(eval_injection(&inspector, &test_rows));
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpora_are_recognised_and_bad_lines_named() {
        let inj = r#"{"id":"a","text":"hi","label":0,"kind":"benign","meta":{}}"#;
        assert!(matches!(parse_corpus(inj), Ok(Corpus::Injection(r)) if r.len() == 1));
        let dlp = r#"{"id":"d","text":"x","label":0,"entities":[],"decoys":[]}"#;
        assert!(matches!(parse_corpus(dlp), Ok(Corpus::Dlp(r)) if r.len() == 1));
        let bad = format!("{inj}\n{{\"text\": 1}}\n");
        let err = parse_corpus(&bad)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("line 2:"), "{err}");
        assert!(matches!(parse_corpus("\n"), Err(CorpusError::Empty)));
    }

    #[test]
    fn counts_give_the_usual_ratios() {
        let c = Counts {
            tp: 8,
            fp: 2,
            fn_: 2,
            tn: 88,
        };
        assert!((c.precision() - 0.8).abs() < 1e-9);
        assert!((c.recall() - 0.8).abs() < 1e-9);
        assert!((c.f1() - 0.8).abs() < 1e-9);
        assert!((c.fp_rate() - 2.0 / 90.0).abs() < 1e-9);
    }
}
