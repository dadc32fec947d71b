//! A small Kusto-like pipeline language over the audit log, enough to run detection queries as
//! SOC teams write them:
//!
//! ```text
//! AgentAuditLog
//! | where agent_purpose != "code-review" and resource_type == "database"
//! | where timestamp > ago(1h)
//! | summarize action_count = count() by agent_id, bin(timestamp, 5m)
//! | where action_count > percentile_threshold_95
//! | project agent_id, action_count, timestamp
//! ```
//!
//! Stages: `where`, `project`, `extend name = expr`, `summarize agg, ... [by key, ...]` (`count()`,
//! `dcount(x)`, `sum(x)`, `avg(x)`, `min(x)`, `max(x)`, `percentile(x, p)`), `sort by x [asc|desc]`,
//! `top n by x [asc|desc]`, `take n` / `limit n`. Expressions: `==`, `!=`, `<`, `<=`, `>`, `>=`,
//! `in (...)`, `!in (...)`, `not(...)`, `and`/`or` (any case), `+ - * /`, strings, numbers,
//! durations (`30s`, `5m`, `1h`, `7d`), `true`/`false`, `ago(d)`, `now()`, `bin(x, d)`,
//! `tolower(x)`, `strlen(x)`, `isnull(x)`, `isnotnull(x)`. `percentile_threshold_NN` in a comparison is
//! the NN-th percentile of the other side over the rows at that stage. Window functions over the
//! rows at a stage, per group: `percentile_by(x, p, key, ...)` (the p-th percentile of x among
//! the rows with the same keys, e.g. an agent's own baseline) and `count_by(key, ...)`. A name that is no column
//! is looked up in the named lists (from the config), else it is an error that points at it.
//!
//! The table is the audit log flattened to columns (see [`COLUMNS`]); any field of an event is
//! also reachable by its path, e.g. `detail.route`.

use serde_json::{Map, Value, json};
use std::borrow::Cow;
use std::collections::HashMap;

/// The named columns of an event row, and where they come from.
pub const COLUMNS: &[(&str, &str)] = &[
    ("timestamp", "event time (nanoseconds; shown as RFC 3339)"),
    ("event_id", "event id"),
    (
        "kind",
        "event kind (gateway.decision, mcp.tool_call, token.issued, ...)",
    ),
    ("agent_id", "acting principal id"),
    ("agent_model", "provider/model@version of an agent"),
    ("agent_owner", "owner of an agent"),
    ("agent_purpose", "purpose tag of an agent"),
    ("action_taken", "action (read, write, destructive, ...)"),
    ("resource_accessed", "resource (Cedar entity)"),
    (
        "resource_type",
        "what the resource holds (the route's or server's kind)",
    ),
    ("initiating_user", "the human who started a delegated task"),
    ("allowed", "the decision"),
    ("deciding_policies", "policies that decided"),
    ("status", "response status"),
    ("bytes_in", "request body bytes"),
    ("bytes_out", "response body bytes"),
    ("latency_us", "latency in microseconds"),
    ("trace_id", "W3C trace id"),
    ("request_id", "request id"),
    ("session", "agent session id"),
    ("alert_rule", "alert raised, if any"),
    ("alert_severity", "its severity"),
    ("reasoning", "the agent's stated reasoning (masked)"),
];

/// A query error, with where in the query it is (1-based character column).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (at column {column}: `{token}`)")]
pub struct QueryError {
    /// What is wrong.
    pub message: String,
    /// 1-based column of the offending token.
    pub column: usize,
    /// The offending token.
    pub token: String,
}

/// Rows: one JSON object per event or per summarized group, in order.
pub type Rows = Vec<Map<String, Value>>;

/// The flattened row of one event (its JSON form), with the named columns.
pub fn row_of(event: &Value) -> Map<String, Value> {
    let get = |p: &str| event.pointer(p).cloned().unwrap_or(Value::Null);
    let mut row = Map::new();
    row.insert("timestamp".into(), get("/time_ns"));
    row.insert("event_id".into(), get("/event_id"));
    row.insert("kind".into(), get("/kind"));
    row.insert("agent_id".into(), get("/principal/id"));
    row.insert("agent_model".into(), get("/principal/model"));
    row.insert("agent_owner".into(), get("/principal/owner"));
    row.insert("agent_purpose".into(), get("/principal/purpose"));
    row.insert("action_taken".into(), get("/action"));
    row.insert("resource_accessed".into(), get("/resource"));
    row.insert("resource_type".into(), get("/detail/resource_type"));
    row.insert(
        "initiating_user".into(),
        get("/delegation/initiating_human"),
    );
    row.insert("allowed".into(), get("/decision/allowed"));
    row.insert("deciding_policies".into(), get("/decision/policies"));
    row.insert("status".into(), get("/outcome/status"));
    row.insert("bytes_in".into(), get("/outcome/bytes_in"));
    row.insert("bytes_out".into(), get("/outcome/bytes_out"));
    row.insert("latency_us".into(), get("/latency_us"));
    row.insert("trace_id".into(), get("/trace_id"));
    row.insert("request_id".into(), get("/request_id"));
    row.insert("session".into(), get("/detail/session"));
    row.insert("alert_rule".into(), get("/alert/rule"));
    row.insert("alert_severity".into(), get("/alert/severity"));
    row.insert("reasoning".into(), get("/reasoning/text"));
    row.insert("__event".into(), event.clone());
    row
}

/// Every event of the store as rows (the whole log is read; fine for the sizes one SQLite
/// deployment holds, and the scale-out issue moves queries to an indexed store).
pub fn rows_from_store(
    store: &dyn palisade_core::store::Store,
) -> Result<Rows, palisade_core::store::StoreError> {
    let mut rows = Vec::new();
    let mut after = 0;
    loop {
        let page = store.read_audit(after, 2000)?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for e in &page {
            if let Ok(v) = serde_json::from_str::<Value>(&e.body) {
                rows.push(row_of(&v));
            }
        }
    }
    Ok(rows)
}

/// Why a query over the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreQueryError {
    /// The query is wrong.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] palisade_core::store::StoreError),
}

/// Every event tied to `id`, oldest first: with that trace id, request id or event id, or with
/// that principal acting or as the human who started the task (delegation); and every event
/// that shares a trace with those.
pub fn trace(rows: Rows, id: &str) -> Answer {
    let is = |r: &Map<String, Value>, c: &str| r.get(c).and_then(Value::as_str) == Some(id);
    let direct = |r: &Map<String, Value>| {
        [
            "trace_id",
            "request_id",
            "event_id",
            "agent_id",
            "initiating_user",
        ]
        .iter()
        .any(|c| is(r, c))
    };
    let traces: std::collections::HashSet<String> = rows
        .iter()
        .filter(|r| direct(r))
        .filter_map(|r| {
            r.get("trace_id")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect();
    let mut picked: Rows = rows
        .into_iter()
        .filter(|r| {
            direct(r)
                || r.get("trace_id")
                    .and_then(Value::as_str)
                    .is_some_and(|t| traces.contains(t))
        })
        .collect();
    picked.sort_by_key(|r| r.get("timestamp").and_then(Value::as_i64).unwrap_or(0));
    let columns: Vec<String> = [
        "timestamp",
        "kind",
        "agent_id",
        "initiating_user",
        "action_taken",
        "resource_accessed",
        "allowed",
        "status",
        "trace_id",
    ]
    .iter()
    .map(|c| (*c).to_string())
    .collect();
    for r in picked.iter_mut() {
        r.retain(|k, _| columns.contains(k));
    }
    Answer {
        columns,
        rows: picked,
    }
}

/// Renders rows as an aligned text table, JSON or CSV (`format`: `table`, `json`, `csv`).
pub fn render(answer: &Answer, format: &str) -> String {
    let cols = &answer.columns;
    let rows = &answer.rows;
    match format {
        "json" => serde_json::to_string_pretty(rows).unwrap_or_default(),
        "csv" => {
            let quote = |s: String| {
                if s.contains([',', '"', '\n']) {
                    format!("\"{}\"", s.replace('"', "\"\""))
                } else {
                    s
                }
            };
            let mut out = cols.join(",");
            out.push('\n');
            for r in rows {
                let line: Vec<String> = cols
                    .iter()
                    .map(|c| quote(cell(c, r.get(c).unwrap_or(&Value::Null))))
                    .collect();
                out.push_str(&line.join(","));
                out.push('\n');
            }
            out
        }
        _ => {
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    cols.iter()
                        .map(|c| cell(c, r.get(c).unwrap_or(&Value::Null)))
                        .collect()
                })
                .collect();
            let widths: Vec<usize> = cols
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    cells
                        .iter()
                        .map(|r| r.get(i).map_or(0, |s| s.chars().count().min(60)))
                        .chain([c.len()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |values: Vec<String>| {
                values
                    .iter()
                    .zip(&widths)
                    .map(|(v, w)| {
                        let v: String = v.chars().take(60).collect();
                        format!("{v:<w$}")
                    })
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_string()
            };
            let mut out = line(cols.clone());
            out.push('\n');
            for r in cells {
                out.push_str(&line(r));
                out.push('\n');
            }
            out.push_str(&format!("({} rows)\n", rows.len()));
            out
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lexer

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(f64),
    /// Nanoseconds.
    Dur(i64),
    Sym(&'static str),
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    column: usize,
    text: String,
}

fn lex(q: &str) -> Result<Vec<Token>, QueryError> {
    let chars: Vec<char> = q.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let err = |i: usize, message: String, text: String| QueryError {
        message,
        column: i + 1,
        token: text,
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        if c == '"' || c == '\'' {
            i += 1;
            let mut s = String::new();
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    i += 1;
                }
                s.push(chars[i]);
                i += 1;
            }
            if i >= chars.len() {
                return Err(err(start, "the string is not closed".into(), c.to_string()));
            }
            i += 1;
            out.push(Token {
                tok: Tok::Str(s),
                column: start + 1,
                text: chars[start..i].iter().collect(),
            });
            continue;
        }
        if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            let number: String = chars[start..i].iter().collect();
            let unit_start = i;
            while i < chars.len() && chars[i].is_ascii_alphabetic() {
                i += 1;
            }
            let unit: String = chars[unit_start..i].iter().collect();
            let text: String = chars[start..i].iter().collect();
            let n: f64 = number
                .parse()
                .map_err(|_| err(start, "not a number".into(), text.clone()))?;
            let tok = match unit.as_str() {
                "" => Tok::Num(n),
                "ms" => Tok::Dur((n * 1e6) as i64),
                "s" => Tok::Dur((n * 1e9) as i64),
                "m" => Tok::Dur((n * 60e9) as i64),
                "h" => Tok::Dur((n * 3600e9) as i64),
                "d" => Tok::Dur((n * 86400e9) as i64),
                _ => {
                    return Err(err(
                        start,
                        "not a number or duration (units: ms, s, m, h, d)".into(),
                        text,
                    ));
                }
            };
            out.push(Token {
                tok,
                column: start + 1,
                text,
            });
            continue;
        }
        if c.is_alphabetic() || c == '_' {
            while i < chars.len()
                && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '.')
            {
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            out.push(Token {
                tok: Tok::Ident(text.clone()),
                column: start + 1,
                text,
            });
            continue;
        }
        let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        let sym = match two.as_str() {
            "==" => Some("=="),
            "!=" => Some("!="),
            "<=" => Some("<="),
            ">=" => Some(">="),
            "!i" if chars.get(i + 2) == Some(&'n') => Some("!in"),
            _ => None,
        };
        if let Some(s) = sym {
            i += s.len();
            out.push(Token {
                tok: Tok::Sym(s),
                column: start + 1,
                text: s.into(),
            });
            continue;
        }
        let one = match c {
            '|' => "|",
            '(' => "(",
            ')' => ")",
            ',' => ",",
            '<' => "<",
            '>' => ">",
            '=' => "=",
            '+' => "+",
            '-' => "-",
            '*' => "*",
            '/' => "/",
            _ => {
                return Err(err(start, "unexpected character".into(), c.to_string()));
            }
        };
        i += 1;
        out.push(Token {
            tok: Tok::Sym(one),
            column: start + 1,
            text: one.into(),
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Parser

#[derive(Clone, Debug)]
enum Expr {
    Lit(Value),
    Col(String, usize),
    Threshold(f64),
    Call(String, Vec<Expr>, usize),
    Not(Box<Expr>),
    Bin(&'static str, Box<Expr>, Box<Expr>),
    In(Box<Expr>, Vec<Expr>, bool),
}

#[derive(Clone, Debug)]
struct Agg {
    name: String,
    func: String,
    args: Vec<Expr>,
}

#[derive(Clone, Debug)]
enum Stage {
    Where(Expr),
    Project(Vec<(String, Expr)>),
    Extend(Vec<(String, Expr)>),
    Summarize(Vec<Agg>, Vec<(String, Expr)>),
    Sort(Expr, bool),
    Top(usize, Expr, bool),
    Take(usize),
}

struct Parser {
    toks: Vec<Token>,
    pos: usize,
    end_column: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.toks.get(self.pos)
    }
    fn error(&self, message: &str) -> QueryError {
        match self.peek() {
            Some(t) => QueryError {
                message: message.into(),
                column: t.column,
                token: t.text.clone(),
            },
            None => QueryError {
                message: message.into(),
                column: self.end_column,
                token: "<end>".into(),
            },
        }
    }
    fn is_sym(&self, s: &str) -> bool {
        matches!(self.peek(), Some(Token { tok: Tok::Sym(x), .. }) if *x == s)
    }
    fn is_word(&self, w: &str) -> bool {
        matches!(self.peek(), Some(Token { tok: Tok::Ident(x), .. }) if x.eq_ignore_ascii_case(w))
    }
    fn expect_sym(&mut self, s: &str) -> Result<(), QueryError> {
        if self.is_sym(s) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(&format!("expected `{s}`")))
        }
    }
    fn ident(&mut self, what: &str) -> Result<(String, usize), QueryError> {
        match self.peek() {
            Some(Token {
                tok: Tok::Ident(x),
                column,
                ..
            }) => {
                let r = (x.clone(), *column);
                self.pos += 1;
                Ok(r)
            }
            _ => Err(self.error(&format!("expected {what}"))),
        }
    }
    fn number(&mut self, what: &str) -> Result<usize, QueryError> {
        match self.peek() {
            Some(Token {
                tok: Tok::Num(n), ..
            }) if *n >= 0.0 => {
                let n = *n as usize;
                self.pos += 1;
                Ok(n)
            }
            _ => Err(self.error(&format!("expected {what}"))),
        }
    }

    fn query(&mut self) -> Result<Vec<Stage>, QueryError> {
        let (_table, _) = self.ident("a table name, e.g. `AgentAuditLog`")?;
        let mut stages = Vec::new();
        while self.peek().is_some() {
            self.expect_sym("|")?;
            let (op, _) =
                self.ident("a stage: where, project, extend, summarize, sort, top, take or limit")?;
            let stage = match op.to_ascii_lowercase().as_str() {
                "where" => Stage::Where(self.expr()?),
                "project" => Stage::Project(self.named_list()?),
                "extend" => Stage::Extend(self.named_list()?),
                "summarize" => {
                    let mut aggs = vec![self.agg()?];
                    while self.is_sym(",") {
                        self.pos += 1;
                        aggs.push(self.agg()?);
                    }
                    let keys = if self.is_word("by") {
                        self.pos += 1;
                        self.named_list()?
                    } else {
                        Vec::new()
                    };
                    Stage::Summarize(aggs, keys)
                }
                "sort" | "order" => {
                    if !self.is_word("by") {
                        return Err(self.error("expected `by`"));
                    }
                    self.pos += 1;
                    let e = self.expr()?;
                    Stage::Sort(e, self.direction())
                }
                "top" => {
                    let n = self.number("how many rows")?;
                    if !self.is_word("by") {
                        return Err(self.error("expected `by`"));
                    }
                    self.pos += 1;
                    let e = self.expr()?;
                    Stage::Top(n, e, self.direction())
                }
                "take" | "limit" => Stage::Take(self.number("how many rows")?),
                _ => {
                    self.pos -= 1;
                    return Err(self.error(
                        "unknown stage; use where, project, extend, summarize, sort, top, take or limit",
                    ));
                }
            };
            stages.push(stage);
        }
        Ok(stages)
    }

    /// Descending unless `asc` is given (Kusto's default).
    fn direction(&mut self) -> bool {
        if self.is_word("asc") {
            self.pos += 1;
            false
        } else {
            if self.is_word("desc") {
                self.pos += 1;
            }
            true
        }
    }

    fn named_list(&mut self) -> Result<Vec<(String, Expr)>, QueryError> {
        let mut out = vec![self.named()?];
        while self.is_sym(",") {
            self.pos += 1;
            out.push(self.named()?);
        }
        Ok(out)
    }

    fn named(&mut self) -> Result<(String, Expr), QueryError> {
        // `name = expr` or `expr` (named after its column or function).
        if let (
            Some(Token {
                tok: Tok::Ident(n), ..
            }),
            Some(Token {
                tok: Tok::Sym("="), ..
            }),
        ) = (self.toks.get(self.pos), self.toks.get(self.pos + 1))
        {
            let name = n.clone();
            self.pos += 2;
            return Ok((name, self.expr()?));
        }
        let e = self.expr()?;
        let name = match &e {
            Expr::Col(c, _) => c.clone(),
            Expr::Call(f, args, _) => match args.first() {
                Some(Expr::Col(c, _)) => c.clone(),
                _ => f.clone(),
            },
            _ => "expr".into(),
        };
        Ok((name, e))
    }

    fn agg(&mut self) -> Result<Agg, QueryError> {
        let (name, expr) = self.named()?;
        match expr {
            Expr::Call(func, args, column) => {
                let f = func.to_ascii_lowercase();
                if !matches!(
                    f.as_str(),
                    "count" | "dcount" | "sum" | "avg" | "min" | "max" | "percentile"
                ) {
                    return Err(QueryError {
                        message: "not an aggregation; use count(), dcount(x), sum(x), avg(x), min(x), max(x) or percentile(x, p)".into(),
                        column,
                        token: func,
                    });
                }
                let name = if name == func || name == "expr" {
                    format!("{f}_")
                } else {
                    name
                };
                Ok(Agg {
                    name: name.trim_end_matches('_').to_string(),
                    func: f,
                    args,
                })
            }
            _ => Err(self.error("expected an aggregation such as count()")),
        }
    }

    fn expr(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.and()?;
        while self.is_word("or") {
            self.pos += 1;
            left = Expr::Bin("or", Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }
    fn and(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.cmp()?;
        while self.is_word("and") {
            self.pos += 1;
            left = Expr::Bin("and", Box::new(left), Box::new(self.cmp()?));
        }
        Ok(left)
    }
    fn cmp(&mut self) -> Result<Expr, QueryError> {
        let left = self.add()?;
        for op in ["==", "!=", "<=", ">=", "<", ">"] {
            if self.is_sym(op) {
                self.pos += 1;
                let right = self.add()?;
                let op: &'static str = match op {
                    "==" => "==",
                    "!=" => "!=",
                    "<=" => "<=",
                    ">=" => ">=",
                    "<" => "<",
                    _ => ">",
                };
                return Ok(Expr::Bin(op, Box::new(left), Box::new(right)));
            }
        }
        let negated = if self.is_sym("!in") {
            true
        } else if self.is_word("in") {
            false
        } else {
            return Ok(left);
        };
        self.pos += 1;
        self.expect_sym("(")?;
        let mut items = vec![self.add()?];
        while self.is_sym(",") {
            self.pos += 1;
            items.push(self.add()?);
        }
        self.expect_sym(")")?;
        Ok(Expr::In(Box::new(left), items, negated))
    }
    fn add(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.mul()?;
        loop {
            let op = if self.is_sym("+") {
                "+"
            } else if self.is_sym("-") {
                "-"
            } else {
                return Ok(left);
            };
            self.pos += 1;
            left = Expr::Bin(op, Box::new(left), Box::new(self.mul()?));
        }
    }
    fn mul(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.primary()?;
        loop {
            let op = if self.is_sym("*") {
                "*"
            } else if self.is_sym("/") {
                "/"
            } else {
                return Ok(left);
            };
            self.pos += 1;
            left = Expr::Bin(op, Box::new(left), Box::new(self.primary()?));
        }
    }
    fn primary(&mut self) -> Result<Expr, QueryError> {
        let Some(t) = self.peek().cloned() else {
            return Err(self.error("expected a value"));
        };
        self.pos += 1;
        match t.tok {
            Tok::Str(s) => Ok(Expr::Lit(json!(s))),
            Tok::Num(n) => Ok(Expr::Lit(json!(n))),
            Tok::Dur(d) => Ok(Expr::Lit(json!(d))),
            Tok::Sym("(") => {
                let e = self.expr()?;
                self.expect_sym(")")?;
                Ok(e)
            }
            Tok::Sym("-") => {
                let e = self.primary()?;
                Ok(Expr::Bin("-", Box::new(Expr::Lit(json!(0))), Box::new(e)))
            }
            Tok::Ident(name) => {
                let lower = name.to_ascii_lowercase();
                if self.is_sym("(") {
                    self.pos += 1;
                    let mut args = Vec::new();
                    if !self.is_sym(")") {
                        args.push(self.expr()?);
                        while self.is_sym(",") {
                            self.pos += 1;
                            args.push(self.expr()?);
                        }
                    }
                    self.expect_sym(")")?;
                    if lower == "not" {
                        let Some(inner) = args.into_iter().next() else {
                            return Err(QueryError {
                                message: "not() takes one expression".into(),
                                column: t.column,
                                token: name,
                            });
                        };
                        return Ok(Expr::Not(Box::new(inner)));
                    }
                    return Ok(Expr::Call(name, args, t.column));
                }
                match lower.as_str() {
                    "true" => Ok(Expr::Lit(json!(true))),
                    "false" => Ok(Expr::Lit(json!(false))),
                    "null" => Ok(Expr::Lit(Value::Null)),
                    _ => {
                        if let Some(p) = lower.strip_prefix("percentile_threshold_")
                            && let Ok(p) = p.parse::<f64>()
                        {
                            return Ok(Expr::Threshold(p));
                        }
                        Ok(Expr::Col(name, t.column))
                    }
                }
            }
            Tok::Sym(_) => {
                self.pos -= 1;
                Err(self.error("expected a value"))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation

struct Env<'a> {
    now_ns: i64,
    lists: &'a HashMap<String, Vec<Value>>,
    /// Values computed over all rows of the current stage (thresholds, per-group percentiles
    /// and counts), so each is computed once per stage rather than once per row.
    cache: std::cell::RefCell<HashMap<String, Value>>,
}

impl Env<'_> {
    /// The value cached under `key`, computing (and caching) every group of `family` with
    /// `fill` on a miss.
    fn cached(&self, key: &str, fill: impl FnOnce() -> Vec<(String, Value)>) -> Value {
        if let Some(v) = self.cache.borrow().get(key) {
            return v.clone();
        }
        let computed = fill();
        let mut cache = self.cache.borrow_mut();
        cache.extend(computed);
        cache.get(key).cloned().unwrap_or(Value::Null)
    }
}

fn num(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok(),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        _ => None,
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Null => false,
        Value::Number(n) => n.as_f64().is_some_and(|x| x != 0.0),
        Value::String(s) => !s.is_empty(),
        _ => true,
    }
}

fn equal(a: &Value, b: &Value) -> bool {
    match (num(a), num(b), a, b) {
        (_, _, Value::String(x), Value::String(y)) => x == y,
        (Some(x), Some(y), _, _) => (x - y).abs() < 1e-9,
        _ => a == b,
    }
}

fn percentile(values: &mut [f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let rank = ((p / 100.0) * (values.len() as f64 - 1.0)).round() as usize;
    values.get(rank.min(values.len() - 1)).copied()
}

fn known_column(name: &str) -> bool {
    COLUMNS.iter().any(|(c, _)| *c == name) || name.contains('.')
}

/// Checks every name in an expression against the columns in scope and the named lists.
fn check_names(
    e: &Expr,
    scope: &[String],
    lists: &HashMap<String, Vec<Value>>,
) -> Result<(), QueryError> {
    match e {
        Expr::Col(c, column) => {
            if scope.iter().any(|s| s == c)
                || lists.contains_key(c)
                || (scope.is_empty() && known_column(c))
            {
                Ok(())
            } else {
                Err(QueryError {
                    message: format!(
                        "unknown name; columns here are {}, and named lists {}",
                        if scope.is_empty() {
                            COLUMNS
                                .iter()
                                .map(|(c, _)| *c)
                                .collect::<Vec<_>>()
                                .join(", ")
                        } else {
                            scope.join(", ")
                        },
                        if lists.is_empty() {
                            "(none configured)".to_string()
                        } else {
                            lists.keys().cloned().collect::<Vec<_>>().join(", ")
                        }
                    ),
                    column: *column,
                    token: c.clone(),
                })
            }
        }
        Expr::Call(f, args, column) => {
            let known = matches!(
                f.to_ascii_lowercase().as_str(),
                "ago"
                    | "now"
                    | "bin"
                    | "tolower"
                    | "toupper"
                    | "strlen"
                    | "isnull"
                    | "isnotnull"
                    | "hourofday"
                    | "percentile_by"
                    | "count_by"
            );
            if !known {
                return Err(QueryError {
                    message: "unknown function; use ago, now, bin, hourofday, tolower, toupper, strlen, isnull, isnotnull, percentile_by or count_by".into(),
                    column: *column,
                    token: f.clone(),
                });
            }
            args.iter().try_for_each(|a| check_names(a, scope, lists))
        }
        Expr::Not(x) => check_names(x, scope, lists),
        Expr::Bin(_, a, b) => {
            check_names(a, scope, lists)?;
            check_names(b, scope, lists)
        }
        Expr::In(x, items, _) => {
            check_names(x, scope, lists)?;
            items.iter().try_for_each(|i| check_names(i, scope, lists))
        }
        Expr::Lit(_) | Expr::Threshold(_) => Ok(()),
    }
}

/// An operand of a comparison: literals and the row's columns are borrowed, not copied (a
/// filter runs once per event).
fn operand<'v>(
    e: &'v Expr,
    row: &'v Map<String, Value>,
    env: &Env<'_>,
    rows: &[Map<String, Value>],
) -> Cow<'v, Value> {
    match e {
        Expr::Lit(v) => Cow::Borrowed(v),
        Expr::Col(c, _) => match row.get(c) {
            Some(v) => Cow::Borrowed(v),
            None => Cow::Owned(eval(e, row, env, rows)),
        },
        _ => Cow::Owned(eval(e, row, env, rows)),
    }
}

fn eval<'e>(
    e: &'e Expr,
    row: &'e Map<String, Value>,
    env: &Env<'_>,
    rows: &[Map<String, Value>],
) -> Value {
    match e {
        Expr::Lit(v) => v.clone(),
        Expr::Col(c, _) => {
            if let Some(v) = row.get(c) {
                return v.clone();
            }
            if let Some(list) = env.lists.get(c) {
                return Value::Array(list.clone());
            }
            // A path into the event: `detail.route`.
            row.get("__event")
                .and_then(|ev| ev.pointer(&format!("/{}", c.replace('.', "/"))))
                .cloned()
                .unwrap_or(Value::Null)
        }
        Expr::Threshold(p) => json!(*p),
        Expr::Not(x) => json!(!truthy(&eval(x, row, env, rows))),
        Expr::Bin(op, a, b) => {
            // `x > percentile_threshold_95`: the threshold is the 95th percentile of x over the
            // rows at this stage.
            let resolve = |side: &'e Expr, other: &Expr| -> Cow<'e, Value> {
                match side {
                    Expr::Threshold(p) => {
                        let key = format!("threshold|{p}|{other:?}");
                        Cow::Owned(env.cached(&key, || {
                            let mut values: Vec<f64> = rows
                                .iter()
                                .filter_map(|r| num(&eval(other, r, env, rows)))
                                .collect();
                            let v = percentile(&mut values, *p).map_or(Value::Null, |v| json!(v));
                            vec![(key.clone(), v)]
                        }))
                    }
                    _ => operand(side, row, env, rows),
                }
            };
            let (x, y) = (resolve(a, b), resolve(b, a));
            let (x, y) = (x.as_ref(), y.as_ref());
            match *op {
                "and" => json!(truthy(x) && truthy(y)),
                "or" => json!(truthy(x) || truthy(y)),
                "==" => json!(equal(x, y)),
                "!=" => json!(!equal(x, y) && !x.is_null()),
                "<" | "<=" | ">" | ">=" => {
                    let ord = match (num(x), num(y), x, y) {
                        (_, _, Value::String(s), Value::String(t)) => Some(s.cmp(t)),
                        (Some(p), Some(q), _, _) => p.partial_cmp(&q),
                        _ => None,
                    };
                    json!(ord.is_some_and(|o| match *op {
                        "<" => o.is_lt(),
                        "<=" => o.is_le(),
                        ">" => o.is_gt(),
                        _ => o.is_ge(),
                    }))
                }
                "+" | "-" | "*" | "/" => match (num(x), num(y)) {
                    (Some(p), Some(q)) => {
                        let r = match *op {
                            "+" => p + q,
                            "-" => p - q,
                            "*" => p * q,
                            _ if q != 0.0 => p / q,
                            _ => return Value::Null,
                        };
                        if r.fract() == 0.0 && r.abs() < 9.0e15 {
                            json!(r as i64)
                        } else {
                            json!(r)
                        }
                    }
                    _ => Value::Null,
                },
                _ => Value::Null,
            }
        }
        Expr::In(x, items, negated) => {
            let v = operand(x, row, env, rows);
            let v = v.as_ref();
            let mut found = false;
            for item in items {
                if let Expr::Col(c, _) = item
                    && !row.contains_key(c)
                    && let Some(list) = env.lists.get(c)
                {
                    found |= list.iter().any(|l| equal(v, l));
                    continue;
                }
                match operand(item, row, env, rows).as_ref() {
                    Value::Array(list) => found |= list.iter().any(|l| equal(v, l)),
                    other => found |= equal(v, other),
                }
            }
            Value::Bool(found != *negated)
        }
        Expr::Call(f, args, _) => {
            let arg = |i: usize| args.get(i).map_or(Value::Null, |a| eval(a, row, env, rows));
            match f.to_ascii_lowercase().as_str() {
                "now" => json!(env.now_ns),
                "ago" => num(&arg(0)).map_or(Value::Null, |d| json!(env.now_ns - d as i64)),
                "bin" => match (num(&arg(0)), num(&arg(1))) {
                    (Some(x), Some(size)) if size > 0.0 => {
                        json!(((x / size).floor() * size) as i64)
                    }
                    _ => Value::Null,
                },
                "tolower" => arg(0)
                    .as_str()
                    .map_or(Value::Null, |s| json!(s.to_lowercase())),
                "toupper" => arg(0)
                    .as_str()
                    .map_or(Value::Null, |s| json!(s.to_uppercase())),
                "strlen" => arg(0)
                    .as_str()
                    .map_or(Value::Null, |s| json!(s.chars().count())),
                "isnull" => json!(arg(0).is_null()),
                "hourofday" => num(&arg(0)).map_or(Value::Null, |ns| {
                    json!(((ns as i64).div_euclid(3_600_000_000_000)).rem_euclid(24))
                }),
                "isnotnull" => json!(!arg(0).is_null()),
                // Window functions over the rows of this stage, per group of the key columns:
                // `percentile_by(x, p, key, ...)` and `count_by(key, ...)`.
                "percentile_by" | "count_by" => {
                    let by_percentile = f.eq_ignore_ascii_case("percentile_by");
                    let keys = args.get(if by_percentile { 2 } else { 0 }..).unwrap_or(&[]);
                    let group = |r: &Map<String, Value>| {
                        Value::Array(keys.iter().map(|k| eval(k, r, env, rows)).collect())
                            .to_string()
                    };
                    let family = format!("{f}|{args:?}|");
                    let key = format!("{family}{}", group(row));
                    env.cached(&key, || {
                        let mut groups: HashMap<String, Vec<f64>> = HashMap::new();
                        for r in rows {
                            let values = groups.entry(group(r)).or_default();
                            if by_percentile {
                                if let Some(x) =
                                    args.first().and_then(|x| num(&eval(x, r, env, rows)))
                                {
                                    values.push(x);
                                }
                            } else {
                                values.push(1.0);
                            }
                        }
                        let p = args
                            .get(1)
                            .and_then(|p| num(&eval(p, row, env, rows)))
                            .unwrap_or(50.0);
                        groups
                            .into_iter()
                            .map(|(g, mut values)| {
                                let v = if by_percentile {
                                    percentile(&mut values, p).map_or(Value::Null, |v| json!(v))
                                } else {
                                    json!(values.len())
                                };
                                (format!("{family}{g}"), v)
                            })
                            .collect()
                    })
                }
                _ => Value::Null,
            }
        }
    }
}

/// Checks a query without running it: syntax, functions, and every name (a column, a path, or
/// one of `lists`).
pub fn check(query: &str, lists: &[&str]) -> Result<(), QueryError> {
    let known: HashMap<String, Vec<Value>> = lists
        .iter()
        .map(|l| ((*l).to_string(), Vec::new()))
        .collect();
    run(query, Vec::new(), 0, &known).map(|_| ())
}

/// A query's answer: its columns (in order) and rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// Column names.
    pub columns: Vec<String>,
    /// Rows.
    pub rows: Rows,
}

/// Runs `query` over event rows (from [`row_of`]) at time `now_ns`, with named lists.
pub fn run(
    query: &str,
    rows: Rows,
    now_ns: i64,
    lists: &HashMap<String, Vec<Value>>,
) -> Result<Answer, QueryError> {
    let stages = parse(query)?;
    execute(&stages, rows, now_ns, lists)
}

fn parse(query: &str) -> Result<Vec<Stage>, QueryError> {
    let toks = lex(query)?;
    let mut parser = Parser {
        toks,
        pos: 0,
        end_column: query.chars().count() + 1,
    };
    parser.query()
}

/// Whether evaluating `e` for one row reads the other rows of the stage (thresholds and
/// window functions); only then does a stage keep a snapshot of them.
fn needs_rows(e: &Expr) -> bool {
    match e {
        Expr::Threshold(_) => true,
        Expr::Call(f, args, _) => {
            f.eq_ignore_ascii_case("percentile_by")
                || f.eq_ignore_ascii_case("count_by")
                || args.iter().any(needs_rows)
        }
        Expr::Not(x) => needs_rows(x),
        Expr::Bin(_, a, b) => needs_rows(a) || needs_rows(b),
        Expr::In(x, items, _) => needs_rows(x) || items.iter().any(needs_rows),
        Expr::Lit(_) | Expr::Col(..) => false,
    }
}

/// Whether `e` names an event field by its path (`detail.route`), which needs the whole event.
fn uses_paths(e: &Expr) -> bool {
    match e {
        Expr::Col(c, _) => c.contains('.'),
        Expr::Call(_, args, _) => args.iter().any(uses_paths),
        Expr::Not(x) => uses_paths(x),
        Expr::Bin(_, a, b) => uses_paths(a) || uses_paths(b),
        Expr::In(x, items, _) => uses_paths(x) || items.iter().any(uses_paths),
        Expr::Lit(_) | Expr::Threshold(_) => false,
    }
}

/// Raises `bound` to the lower bound that `e` (a filter) puts on `timestamp`, when it is a
/// conjunction holding `timestamp > X` (or `>=`, or `X < timestamp`) with X a constant.
fn time_bound(e: &Expr, env: &Env<'_>, bound: &mut Option<i64>) {
    let constant = |x: &Expr| {
        let mut cols = Vec::new();
        columns_of(x, &mut cols);
        if !cols.is_empty() || needs_rows(x) {
            return None;
        }
        num(&eval(x, &Map::new(), env, &[])).map(|v| v as i64)
    };
    let is_time = |x: &Expr| matches!(x, Expr::Col(c, _) if c == "timestamp");
    match e {
        Expr::Bin(op, a, b) if op.eq_ignore_ascii_case("and") => {
            time_bound(a, env, bound);
            time_bound(b, env, bound);
        }
        Expr::Bin(">" | ">=", a, b) if is_time(a) => {
            if let Some(v) = constant(b) {
                *bound = Some(bound.map_or(v, |c| c.max(v)));
            }
        }
        Expr::Bin("<" | "<=", a, b) if is_time(b) => {
            if let Some(v) = constant(a) {
                *bound = Some(bound.map_or(v, |c| c.max(v)));
            }
        }
        _ => {}
    }
}

/// The column names `e` reads.
fn columns_of<'e>(e: &'e Expr, out: &mut Vec<&'e str>) {
    match e {
        Expr::Col(c, _) => out.push(c),
        Expr::Call(_, args, _) => args.iter().for_each(|a| columns_of(a, out)),
        Expr::Not(x) => columns_of(x, out),
        Expr::Bin(_, a, b) => {
            columns_of(a, out);
            columns_of(b, out);
        }
        Expr::In(x, items, _) => {
            columns_of(x, out);
            items.iter().for_each(|i| columns_of(i, out));
        }
        Expr::Lit(_) | Expr::Threshold(_) => {}
    }
}

fn stage_exprs(stage: &Stage) -> Vec<&Expr> {
    match stage {
        Stage::Where(e) | Stage::Sort(e, _) | Stage::Top(_, e, _) => vec![e],
        Stage::Extend(cols) | Stage::Project(cols) => cols.iter().map(|(_, e)| e).collect(),
        Stage::Summarize(aggs, keys) => keys
            .iter()
            .map(|(_, e)| e)
            .chain(aggs.iter().flat_map(|a| a.args.iter()))
            .collect(),
        Stage::Take(_) => Vec::new(),
    }
}

/// Runs `query` over every event of `store`, streaming: the leading `where` stages filter each
/// event as it is read (only matching rows are kept), and events are read into their columns
/// without the whole event unless the query names a field by its path.
pub fn run_on_store(
    query: &str,
    store: &dyn palisade_core::store::Store,
    now_ns: i64,
    lists: &HashMap<String, Vec<Value>>,
) -> Result<Answer, StoreQueryError> {
    let stages = parse(query)?;
    let whole = stages.iter().flat_map(stage_exprs).any(uses_paths);
    let leading = stages
        .iter()
        .take_while(|s| matches!(s, Stage::Where(e) if !needs_rows(e)))
        .count();
    let filters: Vec<&Expr> = stages[..leading]
        .iter()
        .filter_map(|s| match s {
            Stage::Where(e) => Some(e),
            _ => None,
        })
        .collect();
    for f in &filters {
        check_names(f, &[], lists)?;
    }
    let env = Env {
        now_ns,
        lists,
        cache: std::cell::RefCell::default(),
    };
    // The filters see only the columns they name; a row that passes is built with what the
    // rest of the query reads up to its first `project` or `summarize` (all columns if none).
    let mut named: Vec<&str> = Vec::new();
    for f in &filters {
        columns_of(f, &mut named);
    }
    let rest = &stages[leading..];
    let needed: Option<Vec<&str>> = rest
        .iter()
        .position(|s| matches!(s, Stage::Project(_) | Stage::Summarize(..)))
        .map(|k| {
            let mut cols = Vec::new();
            for stage in &rest[..=k] {
                for e in stage_exprs(stage) {
                    columns_of(e, &mut cols);
                }
            }
            cols
        });
    // A lower bound on `timestamp` in the leading filters skips the older part of the log
    // (found by binary search; an hour of slack covers events committed well after they
    // started, such as long requests).
    let mut start = 0;
    let mut bound: Option<i64> = None;
    for f in &filters {
        time_bound(f, &env, &mut bound);
    }
    if let Some(b) = bound {
        const SLACK_NS: i64 = 3_600 * 1_000_000_000;
        start = store
            .audit_seq_from_time(b.saturating_sub(SLACK_NS))?
            .saturating_sub(1);
    }
    // Rows whose fact columns are filled are filtered, and built when the query reads no other
    // column, without reading their bodies.
    let on_facts = |cols: &[&str]| {
        cols.iter()
            .all(|c| !known_column(c) || FACT_COLUMNS.contains(c))
    };
    let filter_on_facts = !whole && on_facts(&named);
    let rows_from_facts = filter_on_facts && needed.as_deref().is_some_and(on_facts);
    // A `summarize` right after the filters takes the rows as they are read, so they are
    // never all held at once.
    let streamed = match rest.first() {
        Some(Stage::Summarize(aggs, keys)) if Grouper::streams(aggs, keys) => {
            for (_, e) in keys {
                check_names(e, &[], lists)?;
            }
            for e in aggs.iter().flat_map(|a| &a.args) {
                check_names(e, &[], lists)?;
            }
            Some((aggs, keys))
        }
        _ => None,
    };
    let mut grouper = streamed.map(|(aggs, keys)| Grouper::new(aggs, keys));
    // When the groups need only the fact columns, the scanning thread groups the rows itself
    // (one reused row, nothing handed over).
    let mut scan_grouper = if rows_from_facts {
        grouper.take()
    } else {
        None
    };
    let mut rows = Vec::new();
    let mut keep = |row: Map<String, Value>, env: &Env<'_>| match grouper.as_mut() {
        Some(g) => g.add(&row, env, &[]),
        None => rows.push(row),
    };
    // One thread scans the store (and filters on the fact columns) while this one parses the
    // bodies it passes on, in log order.
    let grouped = std::thread::scope(|scope| -> Result<Option<Grouper<'_>>, StoreQueryError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Pending>>(4);
        let named = &named;
        let needed = needed.as_deref();
        let filters = &filters;
        let scanner = scope.spawn(move || {
            let env = Env {
                now_ns,
                lists,
                cache: std::cell::RefCell::default(),
            };
            let mut page: Vec<Pending> = Vec::with_capacity(PAGE);
            let mut stopped = false;
            let mut probe = Map::new();
            // A body the store cannot hand over fails the query (rather than leaving its event
            // out of the answer).
            let mut unreadable = None;
            let passes =
                |row: &Map<String, Value>| filters.iter().all(|f| truthy(&eval(f, row, &env, &[])));
            let result = store.scan_audit(start, u64::MAX, &mut |row| {
                let facts = row.facts().filter(|_| filter_on_facts);
                if let Some(facts) = facts {
                    if !filters.is_empty() {
                        fill_fact_row(&mut probe, row, facts, named);
                        if !passes(&probe) {
                            return true;
                        }
                    }
                    if let Some(g) = scan_grouper.as_mut() {
                        fill_fact_row(&mut probe, row, facts, needed.unwrap_or(&[]));
                        g.add(&probe, &env, &[]);
                    } else if rows_from_facts {
                        let mut out = Map::new();
                        fill_fact_row(&mut out, row, facts, needed.unwrap_or(&[]));
                        page.push(Pending::Row(out));
                    } else {
                        // Parsed on the other thread: this one is busy enough reading.
                        let Some(body) = body_or_stop(row, &mut unreadable) else {
                            return false;
                        };
                        page.push(Pending::Passed(body.to_string()));
                    }
                } else if let Some(g) = scan_grouper.as_mut() {
                    // An event stored before the fact columns: its body, here, in order.
                    let Some(body) = body_or_stop(row, &mut unreadable) else {
                        return false;
                    };
                    let Ok(light) = serde_json::from_str::<LightEvent<'_>>(body) else {
                        return true;
                    };
                    if filters.is_empty() || passes(&light.row(Some(named.as_slice()))) {
                        g.add(&light.row(needed), &env, &[]);
                    }
                } else {
                    let Some(body) = body_or_stop(row, &mut unreadable) else {
                        return false;
                    };
                    page.push(Pending::Body(body.to_string()));
                }
                if page.len() >= PAGE {
                    let full = std::mem::replace(&mut page, Vec::with_capacity(PAGE));
                    if tx.send(full).is_err() {
                        stopped = true;
                        return false;
                    }
                }
                true
            });
            if !stopped && !page.is_empty() {
                let _ = tx.send(page);
            }
            match unreadable {
                Some(e) => Err(e),
                None => result.map(|()| scan_grouper),
            }
        });
        for page in rx {
            for pending in page {
                let body = match pending {
                    Pending::Row(row) => {
                        keep(row, &env);
                        continue;
                    }
                    Pending::Passed(body) => {
                        // Already filtered on its fact columns.
                        if let Ok(light) = serde_json::from_str::<LightEvent<'_>>(&body) {
                            keep(light.row(needed), &env);
                        }
                        continue;
                    }
                    Pending::Body(body) => body,
                };
                if whole {
                    let Ok(v) = serde_json::from_str::<Value>(&body) else {
                        continue;
                    };
                    let row = row_of(&v);
                    if filters.iter().all(|f| truthy(&eval(f, &row, &env, &[]))) {
                        keep(row, &env);
                    }
                    continue;
                }
                let Ok(light) = serde_json::from_str::<LightEvent<'_>>(&body) else {
                    continue;
                };
                if !filters.is_empty() {
                    let probe = light.row(Some(named.as_slice()));
                    if !filters.iter().all(|f| truthy(&eval(f, &probe, &env, &[]))) {
                        continue;
                    }
                }
                keep(light.row(needed), &env);
            }
        }
        scanner
            .join()
            .map_err(|_| {
                StoreQueryError::Store(palisade_core::store::StoreError::Backend(
                    "the audit scan thread failed".into(),
                ))
            })?
            .map_err(StoreQueryError::Store)
    })?;
    if grouped.is_some() {
        grouper = grouped;
    }
    Ok(match (grouper, streamed) {
        (Some(grouper), Some((aggs, keys))) => execute_in(
            &rest[1..],
            grouper.finish(),
            Grouper::columns(aggs, keys),
            now_ns,
            lists,
        )?,
        _ => execute(rest, rows, now_ns, lists)?,
    })
}

/// Rows handed from the scanning thread to the parsing one, per page.
const PAGE: usize = 4096;

/// The named columns a scan row has without its body, when its fact columns are filled.
const FACT_COLUMNS: &[&str] = &[
    "timestamp",
    "event_id",
    "kind",
    "agent_id",
    "action_taken",
    "resource_type",
];

/// One event on its way from the scan to the rows.
enum Pending {
    /// Built from the fact columns alone.
    Row(Map<String, Value>),
    /// Passed the filters on its fact columns; its row needs other columns.
    Passed(String),
    /// Not yet filtered (no fact columns, or the filters read other columns).
    Body(String),
}

/// `row`'s body, or `None` with the store's error kept in `unreadable` (the scan then stops
/// and the query fails, rather than leave the event out of its answer).
fn body_or_stop<'r>(
    row: &'r dyn palisade_core::store::AuditRow,
    unreadable: &mut Option<palisade_core::store::StoreError>,
) -> Option<&'r str> {
    match row.body() {
        Ok(body) => Some(body),
        Err(e) => {
            *unreadable = Some(e);
            None
        }
    }
}

/// Sets `out` to the row of a scanned event from its columns (`only` those of
/// [`FACT_COLUMNS`] it names; others already in `out` stay), the same values [`row_of`] reads
/// from the body. A reused `out` keeps its keys and string buffers, so refilling allocates
/// nothing.
fn fill_fact_row(
    out: &mut Map<String, Value>,
    row: &dyn palisade_core::store::AuditRow,
    (action, resource_type): (Option<&str>, Option<&str>),
    only: &[&str],
) {
    fn set(slot: &mut Value, v: Option<&str>) {
        match (slot, v) {
            (Value::String(s), Some(v)) => {
                s.clear();
                s.push_str(v);
            }
            (slot, v) => *slot = v.map_or(Value::Null, |v| Value::String(v.to_string())),
        }
    }
    for name in FACT_COLUMNS {
        if !only.contains(name) {
            continue;
        }
        if !out.contains_key(*name) {
            out.insert((*name).to_string(), Value::Null);
        }
        let Some(slot) = out.get_mut(*name) else {
            continue;
        };
        match *name {
            "timestamp" => *slot = Value::Number(row.time_ns().into()),
            "event_id" => set(slot, row.event_id()),
            "kind" => set(slot, row.kind()),
            "agent_id" => set(slot, row.principal()),
            "action_taken" => set(slot, action),
            _ => set(slot, resource_type),
        }
    }
}

/// The columns of an event, read without building the whole JSON tree.
#[derive(serde::Deserialize)]
struct LightEvent<'a> {
    time_ns: Option<i64>,
    #[serde(borrow)]
    event_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    kind: Option<Cow<'a, str>>,
    principal: Option<LightPrincipal<'a>>,
    #[serde(borrow)]
    action: Option<Cow<'a, str>>,
    #[serde(borrow)]
    resource: Option<Cow<'a, str>>,
    detail: Option<crate::DetailFields>,
    outcome: Option<LightOutcome>,
    latency_us: Option<u64>,
    #[serde(borrow)]
    trace_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    request_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    delegation: Option<LightDelegation<'a>>,
    #[serde(borrow)]
    decision: Option<LightDecision<'a>>,
    #[serde(borrow)]
    alert: Option<LightAlert<'a>>,
    #[serde(borrow)]
    reasoning: Option<LightReasoning<'a>>,
}

#[derive(serde::Deserialize)]
struct LightPrincipal<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow)]
    owner: Option<Cow<'a, str>>,
    #[serde(borrow)]
    purpose: Option<Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct LightDelegation<'a> {
    #[serde(borrow)]
    initiating_human: Option<Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct LightDecision<'a> {
    allowed: Option<bool>,
    #[serde(borrow)]
    policies: Option<Vec<Cow<'a, str>>>,
}

#[derive(serde::Deserialize)]
struct LightOutcome {
    status: Option<u64>,
    bytes_in: Option<u64>,
    bytes_out: Option<u64>,
}

#[derive(serde::Deserialize)]
struct LightAlert<'a> {
    #[serde(borrow)]
    rule: Option<Cow<'a, str>>,
    #[serde(borrow)]
    severity: Option<Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct LightReasoning<'a> {
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
}

impl LightEvent<'_> {
    /// The same columns as [`row_of`], without `__event`: all of them, or only `only`.
    fn row(&self, only: Option<&[&str]>) -> Map<String, Value> {
        fn s(v: Option<&str>) -> Value {
            v.map_or(Value::Null, |v| Value::String(v.to_string()))
        }
        fn n<T: Copy + Into<serde_json::Number>>(v: Option<T>) -> Value {
            v.map_or(Value::Null, |v| Value::Number(v.into()))
        }
        let p = self.principal.as_ref();
        let d = self.detail.as_ref();
        let dec = self.decision.as_ref();
        let o = self.outcome.as_ref();
        let a = self.alert.as_ref();
        // Collected, then built in one go (a sorted bulk build rather than one insert each).
        let mut row = Vec::with_capacity(only.map_or(COLUMNS.len(), <[&str]>::len));
        for (name, _) in COLUMNS {
            if only.is_some_and(|only| !only.contains(name)) {
                continue;
            }
            let v = match *name {
                "timestamp" => n(self.time_ns),
                "event_id" => s(self.event_id.as_deref()),
                "kind" => s(self.kind.as_deref()),
                "agent_id" => s(p.and_then(|p| p.id.as_deref())),
                "agent_model" => s(p.and_then(|p| p.model.as_deref())),
                "agent_owner" => s(p.and_then(|p| p.owner.as_deref())),
                "agent_purpose" => s(p.and_then(|p| p.purpose.as_deref())),
                "action_taken" => s(self.action.as_deref()),
                "resource_accessed" => s(self.resource.as_deref()),
                "resource_type" => d
                    .and_then(|d| d.resource_type.clone())
                    .unwrap_or(Value::Null),
                "initiating_user" => s(self
                    .delegation
                    .as_ref()
                    .and_then(|d| d.initiating_human.as_deref())),
                "allowed" => dec.and_then(|d| d.allowed).map_or(Value::Null, Value::Bool),
                "deciding_policies" => dec
                    .and_then(|d| d.policies.as_ref())
                    .map_or(Value::Null, |p| {
                        Value::Array(p.iter().map(|p| Value::String(p.to_string())).collect())
                    }),
                "status" => n(o.and_then(|o| o.status)),
                "bytes_in" => n(o.and_then(|o| o.bytes_in)),
                "bytes_out" => n(o.and_then(|o| o.bytes_out)),
                "latency_us" => n(self.latency_us),
                "trace_id" => s(self.trace_id.as_deref()),
                "request_id" => s(self.request_id.as_deref()),
                "session" => d.and_then(|d| d.session.clone()).unwrap_or(Value::Null),
                "alert_rule" => s(a.and_then(|a| a.rule.as_deref())),
                "alert_severity" => s(a.and_then(|a| a.severity.as_deref())),
                "reasoning" => s(self.reasoning.as_ref().and_then(|r| r.text.as_deref())),
                _ => Value::Null,
            };
            row.push(((*name).to_string(), v));
        }
        row.into_iter().collect()
    }
}

/// `summarize` over rows given one at a time: each group keeps its key, its row count and,
/// per aggregate other than `count`, the values of its first argument, so the rows themselves
/// need not be kept (a scan can feed it while reading).
struct Grouper<'q> {
    aggs: &'q [Agg],
    keys: &'q [(String, Expr)],
    groups: Vec<Group>,
    /// Group keys as bytes (each value's JSON, separated by 0x1f, which JSON text never holds
    /// raw); the buffers are reused, so a row that joins an existing group allocates nothing
    /// for its key.
    index: HashMap<Vec<u8>, usize>,
    key: Vec<Value>,
    bytes: Vec<u8>,
}

struct Group {
    key: Vec<Value>,
    rows: usize,
    /// Per aggregate: its first argument's values (empty for `count`).
    values: Vec<Vec<Value>>,
}

impl<'q> Grouper<'q> {
    fn new(aggs: &'q [Agg], keys: &'q [(String, Expr)]) -> Self {
        Self {
            aggs,
            keys,
            groups: Vec::new(),
            index: HashMap::new(),
            key: Vec::with_capacity(keys.len()),
            bytes: Vec::new(),
        }
    }

    /// The columns of the rows it makes.
    fn columns(aggs: &[Agg], keys: &[(String, Expr)]) -> Vec<String> {
        keys.iter()
            .map(|(n, _)| n.clone())
            .chain(aggs.iter().map(|a| a.name.clone()))
            .collect()
    }

    /// Whether a scan can feed this stage row by row (no expression reads other rows).
    fn streams(aggs: &[Agg], keys: &[(String, Expr)]) -> bool {
        !keys.iter().any(|(_, e)| needs_rows(e))
            && !aggs.iter().flat_map(|a| &a.args).any(needs_rows)
    }

    fn add(&mut self, row: &Map<String, Value>, env: &Env<'_>, rows: &[Map<String, Value>]) {
        self.key.clear();
        self.bytes.clear();
        for (_, e) in self.keys {
            let v = eval(e, row, env, rows);
            if serde_json::to_writer(&mut self.bytes, &v).is_err() {
                self.bytes.extend_from_slice(b"?");
            }
            self.bytes.push(0x1f);
            self.key.push(v);
        }
        let slot = match self.index.get(self.bytes.as_slice()) {
            Some(&slot) => slot,
            None => {
                self.groups.push(Group {
                    key: self.key.clone(),
                    rows: 0,
                    values: vec![Vec::new(); self.aggs.len()],
                });
                self.index.insert(self.bytes.clone(), self.groups.len() - 1);
                self.groups.len() - 1
            }
        };
        let Some(group) = self.groups.get_mut(slot) else {
            return;
        };
        group.rows += 1;
        for (a, values) in self.aggs.iter().zip(group.values.iter_mut()) {
            if a.func != "count" {
                values.push(
                    a.args
                        .first()
                        .map_or(Value::Null, |e| eval(e, row, env, rows)),
                );
            }
        }
    }

    /// One row per group, in the order the groups first appeared.
    fn finish(self) -> Rows {
        let (aggs, keys) = (self.aggs, self.keys);
        self.groups
            .into_iter()
            .map(|group| {
                let mut out = Map::new();
                for ((name, _), v) in keys.iter().zip(group.key) {
                    out.insert(name.clone(), v);
                }
                for (a, values) in aggs.iter().zip(group.values) {
                    let nums = || -> Vec<f64> { values.iter().filter_map(num).collect() };
                    let v = match a.func.as_str() {
                        "count" => json!(group.rows),
                        "dcount" => {
                            let mut seen: Vec<String> =
                                values.iter().map(|v| v.to_string()).collect();
                            seen.sort();
                            seen.dedup();
                            json!(seen.len())
                        }
                        "sum" => json!(nums().iter().sum::<f64>()),
                        "avg" => {
                            let n = nums();
                            if n.is_empty() {
                                Value::Null
                            } else {
                                json!(n.iter().sum::<f64>() / n.len() as f64)
                            }
                        }
                        "min" => nums()
                            .into_iter()
                            .reduce(f64::min)
                            .map_or(Value::Null, |v| json!(v)),
                        "max" => nums()
                            .into_iter()
                            .reduce(f64::max)
                            .map_or(Value::Null, |v| json!(v)),
                        _ => {
                            let p = a
                                .args
                                .get(1)
                                .and_then(|e| match e {
                                    Expr::Lit(v) => num(v),
                                    _ => None,
                                })
                                .unwrap_or(50.0);
                            percentile(&mut nums(), p).map_or(Value::Null, |v| json!(v))
                        }
                    };
                    out.insert(a.name.clone(), v);
                }
                out
            })
            .collect()
    }
}

fn execute(
    stages: &[Stage],
    rows: Rows,
    now_ns: i64,
    lists: &HashMap<String, Vec<Value>>,
) -> Result<Answer, QueryError> {
    execute_in(stages, rows, Vec::new(), now_ns, lists)
}

/// [`execute`] on rows that have the columns in `scope` (empty: every event column).
fn execute_in(
    stages: &[Stage],
    mut rows: Rows,
    mut scope: Vec<String>,
    now_ns: i64,
    lists: &HashMap<String, Vec<Value>>,
) -> Result<Answer, QueryError> {
    let env = Env {
        now_ns,
        lists,
        cache: std::cell::RefCell::default(),
    };
    // A stage reads the other rows only through a snapshot, taken only when it needs one.
    let snapshot_of = |rows: &Rows, exprs: &[&Expr]| -> Rows {
        if exprs.iter().any(|e| needs_rows(e)) {
            rows.clone()
        } else {
            Vec::new()
        }
    };
    // Columns in scope after each stage (empty: every event column).
    for stage in stages {
        env.cache.borrow_mut().clear();
        match stage {
            Stage::Where(e) => {
                check_names(e, &scope, lists)?;
                let snapshot = snapshot_of(&rows, &[e]);
                rows.retain(|r| truthy(&eval(e, r, &env, &snapshot)));
            }
            Stage::Extend(cols) | Stage::Project(cols) => {
                for (_, e) in cols {
                    check_names(e, &scope, lists)?;
                }
                let snapshot = snapshot_of(&rows, &stage_exprs(stage));
                let project = matches!(stage, Stage::Project(_));
                for r in rows.iter_mut() {
                    let values: Vec<(String, Value)> = cols
                        .iter()
                        .map(|(n, e)| (n.clone(), eval(e, r, &env, &snapshot)))
                        .collect();
                    if project {
                        r.clear();
                    }
                    r.extend(values);
                }
                let names: Vec<String> = cols.iter().map(|(n, _)| n.clone()).collect();
                if project {
                    scope = names;
                } else if !scope.is_empty() {
                    scope.extend(names);
                }
            }
            Stage::Summarize(aggs, keys) => {
                for (_, e) in keys {
                    check_names(e, &scope, lists)?;
                }
                for a in aggs {
                    for e in &a.args {
                        check_names(e, &scope, lists)?;
                    }
                }
                // The groups are built from the rows themselves (they are replaced).
                let snapshot = std::mem::take(&mut rows);
                let mut grouper = Grouper::new(aggs, keys);
                for r in &snapshot {
                    grouper.add(r, &env, &snapshot);
                }
                rows = grouper.finish();
                scope = Grouper::columns(aggs, keys);
            }
            Stage::Sort(e, desc) | Stage::Top(_, e, desc) => {
                check_names(e, &scope, lists)?;
                let snapshot = snapshot_of(&rows, &[e]);
                let mut keyed: Vec<(Value, Map<String, Value>)> = rows
                    .into_iter()
                    .map(|r| (eval(e, &r, &env, &snapshot), r))
                    .collect();
                keyed.sort_by(|(a, _), (b, _)| {
                    let o = match (num(a), num(b)) {
                        (Some(x), Some(y)) => {
                            x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal)
                        }
                        _ => a.to_string().cmp(&b.to_string()),
                    };
                    if *desc { o.reverse() } else { o }
                });
                rows = keyed.into_iter().map(|(_, r)| r).collect();
                if let Stage::Top(n, ..) = stage {
                    rows.truncate(*n);
                }
            }
            Stage::Take(n) => rows.truncate(*n),
        }
    }
    for r in rows.iter_mut() {
        r.remove("__event");
    }
    let columns = if scope.is_empty() {
        COLUMNS.iter().map(|(c, _)| (*c).to_string()).collect()
    } else {
        scope
    };
    Ok(Answer { columns, rows })
}

/// A cell as text: timestamps as RFC 3339, strings bare, the rest as JSON.
pub fn cell(column: &str, v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Number(n) if column == "timestamp" => n
            .as_i64()
            .and_then(|ns| time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns)).ok())
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| n.to_string()),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rows() -> Rows {
        let mut out = Vec::new();
        let now = 10_000 * 60_000_000_000i64;
        for i in 0..40i64 {
            let agent = if i < 30 { "agent:busy" } else { "agent:calm" };
            out.push(row_of(&json!({
                "time_ns": now - i * 20_000_000_000,
                "event_id": format!("e{i}"),
                "kind": "gateway.decision",
                "principal": { "id": agent, "purpose": if i % 2 == 0 { "code-review" } else { "support" } },
                "action": if i % 3 == 0 { "read" } else { "write" },
                "resource": "Palisade::Route::\"db\"",
                "detail": { "resource_type": if i % 4 == 1 { "database" } else { "keyvault" }, "route": "db" },
                "delegation": { "initiating_human": "human:ann", "actor_chain": [] },
            })));
        }
        out
    }

    const NOW: i64 = 10_000 * 60_000_000_000;

    /// A real store holding 600 events, one a minute up to NOW, from five agents.
    fn store() -> palisade_store::SqliteStore {
        use palisade_core::store::Store;
        let dir = std::env::temp_dir().join(format!("palisade-query-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = palisade_store::SqliteStore::open(&dir).unwrap();
        let mut prev = crate::GENESIS_HASH.to_string();
        let rows: Vec<palisade_core::store::StoredAuditEvent> = (1..=600u64)
            .map(|seq| {
                let mut e = crate::AuditEvent::new("gateway.decision");
                e.time_ns = NOW - (600 - seq as i64) * 60_000_000_000;
                e.principal = Some(crate::PrincipalRef {
                    id: format!("agent:a{}", seq % 5),
                    purpose: Some(
                        if seq % 2 == 0 {
                            "code-review"
                        } else {
                            "support"
                        }
                        .into(),
                    ),
                    ..Default::default()
                });
                e.action = Some(if seq % 3 == 0 { "read" } else { "write" }.into());
                e.resource = Some("Palisade::Route::\"db\"".into());
                e.detail =
                    json!({ "resource_type": if seq % 4 == 1 { "database" } else { "keyvault" } });
                // Events with parts missing or of other types, where the fact columns and the
                // body could disagree.
                if seq % 7 == 0 {
                    e.principal = None;
                }
                if seq % 11 == 0 {
                    e.action = None;
                }
                match seq % 13 {
                    0 => e.detail = json!("not an object"),
                    5 => e.detail = json!({ "resource_type": 5, "session": "s" }),
                    9 => e.detail = json!({ "route": "db" }),
                    _ => {}
                }
                let body = serde_json::to_string(&e).unwrap();
                let hash = crate::chain_hash(&prev, seq, &body);
                palisade_core::store::StoredAuditEvent {
                    seq,
                    event_id: e.event_id.clone(),
                    time_ns: e.time_ns,
                    kind: e.kind.clone(),
                    principal: e.principal.as_ref().map(|p| p.id.clone()),
                    body,
                    prev_hash: std::mem::replace(&mut prev, hash.clone()),
                    hash,
                    // Every other event as stored before the fact columns: queries read
                    // its body.
                    facts: crate::facts_of(&e).filter(|_| seq % 2 == 0),
                }
            })
            .collect();
        store.append_audit(&rows).unwrap();
        store
    }

    #[test]
    fn streaming_over_the_store_answers_as_the_whole_log_does() {
        use palisade_core::store::Store;
        let store = store();
        assert_eq!(
            store
                .audit_seq_from_time(NOW - 100 * 60_000_000_000)
                .unwrap(),
            500
        );
        assert_eq!(store.audit_seq_from_time(NOW + 1).unwrap(), 601);
        assert_eq!(store.audit_seq_from_time(0).unwrap(), 1);
        let mut lists = HashMap::new();
        lists.insert("approved".to_string(), vec![json!("agent:a1")]);
        for q in [
            "AgentAuditLog | where timestamp > ago(30m) | project agent_id, timestamp",
            "AgentAuditLog | where ago(3h) <= timestamp and action_taken == \"read\" | summarize n = count() by agent_id | sort by agent_id",
            "AgentAuditLog | where agent_purpose != \"code-review\" AND resource_type == \"database\" | where timestamp > ago(1h) | project agent_id, resource_accessed, action_taken, initiating_user",
            "AgentAuditLog | summarize action_count = count() by agent_id, bin(timestamp, 5m) | where action_count > percentile_threshold_95 | project agent_id, action_count, timestamp",
            "AgentAuditLog | where resource_type in (\"keyvault\", \"env-vars\") | where action_taken == \"read\" | where not(agent_id in (approved))",
            "AgentAuditLog | where detail.resource_type == \"database\" | take 3",
            "AgentAuditLog | where action_taken == \"read\" and kind != \"x\" | project event_id, kind, resource_type, timestamp, agent_id, action_taken",
            "AgentAuditLog | where resource_type == \"database\" | project agent_purpose, event_id",
            "AgentAuditLog | where action_taken == \"read\" | summarize n = count(), last = max(timestamp), kinds = dcount(kind) by agent_id, resource_type",
            "AgentAuditLog | summarize n = count() by agent_purpose | sort by agent_purpose",
            "AgentAuditLog | where timestamp > ago(2h) | summarize n = count() by detail.resource_type, bin(timestamp, 1h)",
        ] {
            let streamed = run_on_store(q, &store, NOW, &lists).unwrap();
            let whole = run(q, rows_from_store(&store).unwrap(), NOW, &lists).unwrap();
            assert_eq!(streamed, whole, "{q}");
            // Every bin of this even log holds one event, so nothing is above the 95th
            // percentile; the other queries all find rows.
            assert!(
                !streamed.rows.is_empty() || q.contains("percentile_threshold_95"),
                "{q}"
            );
        }
    }

    #[test]
    fn light_rows_match_full_rows() {
        let event = json!({
            "schema": 2, "event_id": "e1", "time_ns": 5, "kind": "gateway.decision",
            "request_id": "r", "trace_id": "t",
            "reasoning": { "text": "why \\ \"quoted\"", "truncated": false },
            "principal": { "id": "agent:a", "model": "m", "owner": "human:o", "purpose": "p" },
            "action": "read", "resource": "Palisade::Route::\"x\"",
            "decision": { "allowed": true, "policies": ["p1"] },
            "outcome": { "status": 200, "bytes_in": 1, "bytes_out": 2 },
            "latency_us": 9,
            "delegation": { "initiating_human": "human:h", "actor_chain": [] },
            "alert": { "severity": "high", "rule": "r", "message": "m" },
            "detail": { "resource_type": "db", "session": "s1", "other": [1, 2] },
        });
        let mut full = row_of(&event);
        full.remove("__event");
        let text = event.to_string();
        let light: LightEvent<'_> = serde_json::from_str(&text).unwrap();
        assert_eq!(light.row(None), full);
        assert_eq!(full.len(), COLUMNS.len());
        let few = light.row(Some(&["agent_id", "status"]));
        assert_eq!(few.len(), 2);
        assert_eq!(few["status"], 200);
    }

    #[test]
    fn the_seeds_three_queries_run_as_written() {
        let mut lists = HashMap::new();
        lists.insert(
            "approved_secret_consumers".to_string(),
            vec![json!("agent:calm")],
        );
        let q1 = r#"AgentAuditLog
| where agent_purpose != "code-review" AND resource_type == "database"
| where timestamp > ago(1h)
| project agent_id, resource_accessed, action_taken, initiating_user"#;
        let out = run(q1, rows(), NOW, &lists).unwrap().rows;
        assert!(!out.is_empty());
        assert!(
            out.iter()
                .all(|r| r.len() == 4 && r["initiating_user"] == "human:ann")
        );

        let q2 = r#"AgentAuditLog
| summarize action_count = count() by agent_id, bin(timestamp, 5m)
| where action_count > percentile_threshold_95
| project agent_id, action_count, timestamp"#;
        let out = run(q2, rows(), NOW, &lists).unwrap().rows;
        assert!(
            out.iter()
                .all(|r| r.contains_key("action_count") && r.contains_key("timestamp"))
        );

        let q3 = r#"AgentAuditLog
| where resource_type in ("keyvault", "secrets-manager", "env-vars")
| where action_taken == "read"
| where not(agent_id in (approved_secret_consumers))"#;
        let out = run(q3, rows(), NOW, &lists).unwrap().rows;
        assert!(!out.is_empty());
        assert!(
            out.iter()
                .all(|r| r["agent_id"] == "agent:busy" && r["action_taken"] == "read")
        );
    }

    #[test]
    fn summaries_sorting_and_paths() {
        let out = run(
            "AgentAuditLog | summarize n = count(), kinds = dcount(action_taken) by agent_id | top 1 by n",
            rows(),
            NOW,
            &HashMap::new(),
        )
        .unwrap()
        .rows;
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["agent_id"], "agent:busy");
        assert_eq!(out[0]["n"], 30);
        assert_eq!(out[0]["kinds"], 2);
        let out = run(
            "AgentAuditLog | where detail.route == 'db' | take 3",
            rows(),
            NOW,
            &HashMap::new(),
        )
        .unwrap()
        .rows;
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn a_trace_gathers_a_humans_task_and_everything_sharing_its_traces() {
        let ev = |id: &str, t: i64, who: &str, human: Option<&str>, trace: &str| {
            let mut e = json!({ "event_id": id, "time_ns": t, "kind": "k",
                "principal": { "id": who }, "trace_id": trace });
            if let Some(h) = human {
                e["delegation"] = json!({ "initiating_human": h, "actor_chain": [] });
            }
            row_of(&e)
        };
        let rows = vec![
            ev("3", 30, "agent:b", None, "t1"),
            ev("1", 10, "human:ann", None, "t0"),
            ev("2", 20, "agent:a", Some("human:ann"), "t1"),
            ev("4", 40, "agent:c", None, "t9"),
        ];
        let answer = trace(rows, "human:ann");
        let ids: Vec<&str> = answer
            .rows
            .iter()
            .map(|r| r["agent_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["human:ann", "agent:a", "agent:b"]);
    }

    #[test]
    fn errors_point_at_the_offending_token() {
        let lists = HashMap::new();
        let e = run("AgentAuditLog | wher x == 1", rows(), NOW, &lists).unwrap_err();
        assert_eq!((e.column, e.token.as_str()), (17, "wher"));
        let e = run(
            "AgentAuditLog | where agent_idd == 'x'",
            rows(),
            NOW,
            &lists,
        )
        .unwrap_err();
        assert_eq!((e.column, e.token.as_str()), (23, "agent_idd"));
        assert!(e.message.contains("unknown name"));
        let e = run("AgentAuditLog | where kind == 'x", rows(), NOW, &lists).unwrap_err();
        assert!(e.message.contains("not closed"), "{e}");
        let e = run(
            "AgentAuditLog | summarize n = count() by agent_id | project kind",
            rows(),
            NOW,
            &lists,
        )
        .unwrap_err();
        assert_eq!(e.token, "kind");
        let e = run("AgentAuditLog | where ago(1x) > 0", rows(), NOW, &lists).unwrap_err();
        assert_eq!(e.token, "1x");
    }
}
