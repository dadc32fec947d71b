//! Command-line arguments and their execution.

use crate::client::Client;
use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use palisade_config::Config;
use reqwest::Method;
use serde_json::{Map, Value, json};
use std::path::PathBuf;
use std::process::ExitCode;

/// Palisade: zero-trust identity, policy and audit for AI agents.
#[derive(Parser)]
#[command(name = "palisade", version, about)]
pub struct Cli {
    /// Server address for client commands.
    #[arg(
        long,
        env = "PALISADE_ADDR",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    addr: String,
    /// Admin token for client commands (default: <data-dir>/admin.token).
    #[arg(long, env = "PALISADE_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Data directory (server state; also where client commands look for admin.token).
    #[arg(long, env = "PALISADE_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Inspect text for prompt injection and sensitive data; score or train on corpora.
    Scan(crate::scan::ScanArgs),
    /// Manage agents.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Manage humans.
    #[command(subcommand)]
    Human(SimpleCmd<HumanFields>),
    /// Manage teams.
    #[command(subcommand)]
    Team(SimpleCmd<TeamFields>),
    /// Manage service accounts.
    #[command(subcommand, name = "service-account")]
    ServiceAccount(SimpleCmd<ServiceAccountFields>),
    /// Token signing keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Configuration files.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Policies: validate and test offline; status and reload on the server.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Agent sessions: list, show, end.
    #[command(subcommand)]
    Session(SessionCmd),
    /// Alerts raised by the detection rules: list them, or run every rule now.
    Alerts {
        #[command(subcommand)]
        cmd: Option<AlertsCmd>,
    },
    /// Kill switch for every agent of a human or team.
    #[command(subcommand)]
    Owner(OwnerCmd),
    /// Kill switch for every agent, for incidents: ends all sessions and suspends all agents.
    Panic(KillArgs),
    /// The MCP gateway's pinned tool definitions.
    #[command(subcommand)]
    Mcp(McpCmd),
    /// Vault secrets that the gateway injects into upstream calls (values are write-only).
    #[command(subcommand)]
    Secret(SecretCmd),
    /// The vault itself.
    #[command(subcommand)]
    Vault(VaultCmd),
    /// Human-in-the-loop approvals: list and show them, approve or deny one.
    #[command(subcommand)]
    Approvals(ApprovalsCmd),
}

#[derive(Subcommand)]
enum ApprovalsCmd {
    /// Approval requests, newest first (with PALISADE_APPROVER_TOKEN set: those you may decide).
    List {
        /// pending, approved, denied, expired, used, withdrawn or all.
        #[arg(long, default_value = "pending")]
        status: String,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One request: what it covers, who may approve, the decisions so far.
    Show { id: String },
    /// Approve a request, as the human whose approver token is in PALISADE_APPROVER_TOKEN.
    Approve {
        id: String,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Deny a request, with a reason the agent and the audit log get.
    Deny {
        id: String,
        /// Why (required).
        #[arg(long)]
        reason: String,
    },
    /// Mint a human's approver token (admin token), until humans sign in through the console.
    Token {
        /// The human, e.g. human:alice.
        human: String,
    },
}

#[derive(Subcommand)]
enum SecretCmd {
    /// Store a new version of a secret. The value is read from standard input (or --value-file,
    /// or --from-env), never from the command line, so it stays out of shell history.
    Put {
        /// Name, e.g. `tickets/api-token`.
        name: String,
        /// What it is for.
        #[arg(long)]
        description: Option<String>,
        /// Read the value from this file.
        #[arg(long, conflicts_with = "from_env")]
        value_file: Option<PathBuf>,
        /// Read the value from this environment variable.
        #[arg(long)]
        from_env: Option<String>,
    },
    /// A secret's metadata (version, dates, master key id); never its value.
    GetMetadata { name: String },
    /// Every secret's metadata.
    List,
    /// Delete a secret.
    Delete { name: String },
}

#[derive(Subcommand)]
enum VaultCmd {
    /// Generate a new master key and rewrap every secret's data key under it (no downtime).
    RotateMaster,
}

#[derive(Subcommand)]
enum McpCmd {
    /// List pinned tools, with the current definition's hash and whether it changed.
    Pins,
    /// Accept a tool's current definition (after reviewing it): it is pinned anew and unblocked.
    Accept {
        /// <server>/<tool>, e.g. git/git_log.
        tool: String,
        /// The SHA-256 of the definition you reviewed (from the alert or `palisade mcp pins`).
        #[arg(long)]
        sha256: String,
    },
}

#[derive(Subcommand)]
enum SessionCmd {
    /// List live sessions.
    List {
        /// Only this agent's.
        #[arg(long)]
        agent: Option<String>,
    },
    /// Show one session, live or ended, with its counters.
    Show { sid: String },
    /// End a session now; the agent must clear its context.
    End {
        sid: String,
        /// Why (audited).
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Subcommand)]
enum OwnerCmd {
    /// End every session of every agent the owner has, and suspend those agents.
    Kill {
        /// human:NAME or team:NAME.
        id: String,
        #[command(flatten)]
        why: KillArgs,
    },
}

#[derive(Args)]
struct KillArgs {
    /// Why (required; audited).
    #[arg(long)]
    reason: String,
    /// Who is acting (default: $USER), recorded with the kill.
    #[arg(long, env = "USER")]
    operator: Option<String>,
}

#[derive(Args)]
struct PolicySource {
    /// Directory of .cedar files (default: the config's policy.dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Config file whose policy.dir to use.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Validate the baseline and a policy directory against the schema (no server needed).
    Validate(PolicySource),
    /// Run a file of table cases against the policies (no server needed); exits 1 on a failure.
    Test {
        /// The case file (TOML, see `palisade_policy::cases`).
        file: PathBuf,
        #[command(flatten)]
        source: PolicySource,
    },
    /// Show the policy set in force on the server and the last reload error.
    Status,
    /// Explain a decision: deciding policies and, for a deny, each permit considered.
    Explain {
        /// The principal, e.g. agent:pr-bot.
        #[arg(long)]
        principal: String,
        /// read, write, destructive, egress or credential.
        #[arg(long)]
        action: String,
        /// A configured route name.
        #[arg(long)]
        route: String,
        /// A rule resource name inside the route.
        #[arg(long)]
        resource: Option<String>,
    },
    /// List what an agent may do on every configured route and rule resource, now.
    WhatCan {
        /// The agent, e.g. pr-bot or agent:pr-bot.
        agent: String,
    },
    /// Show an agent's blast radius and every policy that can apply to it.
    Show {
        /// The agent, e.g. pr-reviewer or agent:pr-reviewer.
        #[arg(long)]
        agent: String,
    },
    /// Make the server reload its policy directory now.
    Reload,
}

#[derive(Args)]
struct ServeArgs {
    /// Config file (palisade.toml).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Run with a demo upstream, owner, agent and policy.
    #[arg(long)]
    demo: bool,
    /// Listen address, overriding the config.
    #[arg(long)]
    listen: Option<String>,
}

#[derive(Subcommand)]
enum AgentCmd {
    /// Register an agent; prints its client secret once.
    Register(Box<AgentRegister>),
    /// List agents.
    List,
    /// Show one agent.
    Show { id: String },
    /// Change fields of an agent (JSON merge patch of editable fields).
    Update {
        id: String,
        /// Fields as JSON, e.g. '{"model_version":"2026-06-01"}'.
        #[arg(long)]
        set: String,
    },
    /// Suspend an agent: its tokens stop working at once.
    Suspend(Lifecycle),
    /// Reactivate a suspended agent.
    Resume(Lifecycle),
    /// Retire an agent for good and destroy its credentials.
    Deprovision(Lifecycle),
    /// Kill switch: end every session of the agent at once and suspend it.
    Kill {
        id: String,
        #[command(flatten)]
        why: KillArgs,
    },
    /// Issue a new client secret; old ones keep working during the overlap.
    RotateSecret {
        id: String,
        /// Seconds the previous secrets stay valid (default 3600).
        #[arg(long)]
        overlap_seconds: Option<u64>,
    },
}

#[derive(Args)]
struct Lifecycle {
    id: String,
    /// Why (recorded with the status change and in the audit log).
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(Args)]
struct AgentRegister {
    /// Agent id, e.g. pr-reviewer or agent:pr-reviewer.
    id: String,
    /// Owner: human:NAME or team:NAME.
    #[arg(long)]
    owner: String,
    /// What the agent is designed to do.
    #[arg(long)]
    purpose: String,
    /// Machine-readable purpose, e.g. pull-request-review.
    #[arg(long)]
    purpose_tag: String,
    /// Model provider, e.g. anthropic.
    #[arg(long)]
    model_provider: String,
    /// Model, e.g. claude-opus-4.
    #[arg(long)]
    model: String,
    /// Model version.
    #[arg(long)]
    model_version: String,
    /// Display name.
    #[arg(long)]
    name: Option<String>,
    /// Route it may reach (repeatable).
    #[arg(long = "allow-route")]
    allowed_resources: Vec<String>,
    /// OAuth scope it may request (repeatable).
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// Days between access reviews (default 90).
    #[arg(long)]
    review_cadence_days: Option<u32>,
    /// Max session minutes (default 30, at most 240).
    #[arg(long)]
    max_session_minutes: Option<u32>,
    /// Max concurrent sessions (default 5).
    #[arg(long)]
    max_concurrent_sessions: Option<u32>,
    /// Files per session limit.
    #[arg(long)]
    max_files_per_session: Option<u32>,
    /// Allow data to leave the organisation.
    #[arg(long)]
    data_egress_allowed: bool,
    /// Gateway rate limit across routes, e.g. 10/s or "600/min burst 20".
    #[arg(long)]
    rate_limit: Option<String>,
    /// Gateway requests in flight at once (1 to 1024).
    #[arg(long)]
    max_concurrent_requests: Option<u32>,
}

#[derive(Subcommand)]
enum SimpleCmd<F: Args> {
    /// Add one.
    Add {
        /// Id, e.g. alice or human:alice.
        id: String,
        #[command(flatten)]
        fields: F,
    },
    /// List them.
    List,
    /// Show one.
    Show { id: String },
    /// Change fields (JSON merge patch of editable fields).
    Update {
        id: String,
        /// Fields as JSON, e.g. '{"may_act":["agent:coder"]}'.
        #[arg(long)]
        set: String,
    },
    /// Suspend one.
    Suspend(Lifecycle),
    /// Reactivate one.
    Resume(Lifecycle),
    /// Retire one for good.
    Deprovision(Lifecycle),
}

trait Fields {
    fn to_json(&self) -> Map<String, Value>;
}

#[derive(Args)]
struct HumanFields {
    /// Display name.
    #[arg(long)]
    name: Option<String>,
    /// Email address.
    #[arg(long)]
    email: Option<String>,
    /// Team membership (repeatable).
    #[arg(long = "team")]
    teams: Vec<String>,
    /// An agent that may act for this human besides the ones it owns (repeatable).
    #[arg(long = "may-act")]
    may_act: Vec<String>,
}

impl Fields for HumanFields {
    fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        put(&mut m, "display_name", &self.name);
        put(&mut m, "email", &self.email);
        m.insert("teams".into(), json!(self.teams));
        m.insert("may_act".into(), json!(self.may_act));
        m
    }
}

#[derive(Args)]
struct TeamFields {
    /// Display name.
    #[arg(long)]
    name: Option<String>,
    /// What the team does.
    #[arg(long, default_value = "")]
    description: String,
}

impl Fields for TeamFields {
    fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        put(&mut m, "display_name", &self.name);
        m.insert("description".into(), json!(self.description));
        m
    }
}

#[derive(Args)]
struct ServiceAccountFields {
    /// Owner: human:NAME or team:NAME.
    #[arg(long)]
    owner: String,
    /// Display name.
    #[arg(long)]
    name: Option<String>,
    /// What the workload is.
    #[arg(long, default_value = "")]
    description: String,
    /// Route it may reach (repeatable).
    #[arg(long = "allow-route")]
    allowed_resources: Vec<String>,
    /// OAuth scope it may request (repeatable).
    #[arg(long = "scope")]
    scopes: Vec<String>,
}

impl Fields for ServiceAccountFields {
    fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        put(&mut m, "display_name", &self.name);
        m.insert("owner".into(), json!(self.owner));
        m.insert("description".into(), json!(self.description));
        m.insert("allowed_resources".into(), json!(self.allowed_resources));
        m.insert("scopes".into(), json!(self.scopes));
        m
    }
}

fn put(m: &mut Map<String, Value>, key: &str, v: &Option<String>) {
    if let Some(v) = v {
        m.insert(key.into(), json!(v));
    }
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Start signing with a new key; the old key stays in the JWKS until its tokens expired.
    Rotate,
    /// Show the key set.
    List,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Show the newest events (and keep following with --follow).
    Tail {
        /// How many events.
        #[arg(long, short = 'n', default_value_t = 20)]
        limit: usize,
        /// Keep printing new events.
        #[arg(long, short)]
        follow: bool,
    },
    /// Check the hash chain, in the database file or in an exported FILE (without the server):
    /// every link, every signed checkpoint, and that no event a checkpoint signed is missing.
    Verify {
        /// An export written by `palisade audit export` (default: the database in --data-dir).
        file: Option<PathBuf>,
        /// A checkpoint (JSON, from `palisade audit checkpoint`) to trust as the starting point
        /// and as the least the chain must reach.
        #[arg(long, value_name = "CHECKPOINT.json")]
        from: Option<PathBuf>,
        /// The public key (base64url) or key id every checkpoint must be signed by.
        #[arg(long)]
        key: Option<String>,
    },
    /// Write the events (after --after) and every signed checkpoint as JSON lines, from the
    /// database in --data-dir (the server may be running).
    Export {
        /// Output file (default: stdout).
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Only events after this sequence number (pair with `verify --from`).
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Sign the chain's head now and print the checkpoint (keep it: `verify --from` checks
    /// later exports against it).
    Checkpoint,
    /// Apply `[audit] retention` now: archive the events older than it (that every sink has
    /// delivered) to a file sealed by a signed checkpoint, then prune them from the store.
    Prune,
    /// The SIEM sinks: how far each has delivered, whether it is failing, and whether
    /// requests are being refused because every required sink fails.
    Sinks,
    /// Every event of a trace, request, event or principal (acting, or as the human who started
    /// the task), oldest first, with every event sharing their traces.
    Trace {
        /// A trace id, request id, event id, or principal id such as `human:alice`.
        id: String,
        /// `table`, `json` or `csv`.
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Run a Kusto-like query over the log in --data-dir (works with the server stopped), e.g.
    /// `AgentAuditLog | where action_taken == "write" | summarize count() by agent_id`.
    Query {
        /// The query.
        query: String,
        /// `table`, `json` or `csv`.
        #[arg(long, default_value = "table")]
        format: String,
        /// A named list for `in (...)`: `--list approved=agent:a,agent:b` (repeatable).
        #[arg(long = "list", value_name = "NAME=A,B,...")]
        lists: Vec<String>,
    },
}

#[derive(Subcommand)]
enum AlertsCmd {
    /// The latest alerts, newest first (the default).
    List {
        /// How many.
        #[arg(long, short = 'n', default_value_t = 50)]
        limit: usize,
    },
    /// Run every detection rule now and show what it raised.
    Run,
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate a config file (and its policy directory) without starting.
    Check { file: PathBuf },
}

const EXIT_CONFIG: u8 = 64;

pub async fn run(cli: Cli) -> Result<ExitCode> {
    let data_dir = cli
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("./palisade-data"));
    let client = || Client::from_env(&cli.addr, cli.token.clone(), &data_dir);
    match cli.command {
        Command::Serve(args) => serve(args, cli.data_dir).await,
        Command::Scan(args) => crate::scan::run(args, cli.json),
        Command::Agent(cmd) => {
            let c = client()?;
            let out = match cmd {
                AgentCmd::Register(a) => {
                    let body = json!({
                        "id": a.id, "owner": a.owner, "purpose": a.purpose, "purpose_tag": a.purpose_tag,
                        "model_provider": a.model_provider, "model": a.model, "model_version": a.model_version,
                        "display_name": a.name, "allowed_resources": a.allowed_resources, "scopes": a.scopes,
                        "review_cadence_days": a.review_cadence_days, "max_session_minutes": a.max_session_minutes,
                        "max_concurrent_sessions": a.max_concurrent_sessions, "max_files_per_session": a.max_files_per_session,
                        "data_egress_allowed": a.data_egress_allowed,
                        "rate_limit": a.rate_limit, "max_concurrent_requests": a.max_concurrent_requests,
                    });
                    let body = strip_nulls(body);
                    let v = c.call(Method::POST, "/agents", Some(body)).await?;
                    print_created(&v, cli.json);
                    return Ok(ExitCode::SUCCESS);
                }
                AgentCmd::List => c.call(Method::GET, "/agents", None).await?,
                AgentCmd::Show { id } => {
                    c.call(Method::GET, &format!("/agents/{id}"), None).await?
                }
                AgentCmd::Update { id, set } => {
                    let patch: Value = serde_json::from_str(&set)
                        .context("--set must be a JSON object, e.g. '{\"model_version\":\"2\"}'")?;
                    c.call(Method::PATCH, &format!("/agents/{id}"), Some(patch))
                        .await?
                }
                AgentCmd::Suspend(l) => lifecycle(&c, "agents", "suspend", l).await?,
                AgentCmd::Resume(l) => lifecycle(&c, "agents", "resume", l).await?,
                AgentCmd::Deprovision(l) => lifecycle(&c, "agents", "deprovision", l).await?,
                AgentCmd::Kill { id, why } => {
                    let v = kill(&c, &format!("/agents/{id}/kill"), why).await?;
                    print_kill(&v, cli.json);
                    return Ok(ExitCode::SUCCESS);
                }
                AgentCmd::RotateSecret {
                    id,
                    overlap_seconds,
                } => {
                    let body = strip_nulls(json!({ "overlap_seconds": overlap_seconds }));
                    let v = c
                        .call(
                            Method::POST,
                            &format!("/agents/{id}/rotate-secret"),
                            Some(body),
                        )
                        .await?;
                    if cli.json {
                        println!("{}", pretty(&v));
                    } else {
                        println!("client_id:     {}", v["client_id"].as_str().unwrap_or(""));
                        println!(
                            "client_secret: {}",
                            v["client_secret"].as_str().unwrap_or("")
                        );
                        println!(
                            "previous secrets expire at {}",
                            v["previous_secrets_expire_at"].as_str().unwrap_or("now")
                        );
                        println!("Store the secret now: it is shown only once.");
                    }
                    return Ok(ExitCode::SUCCESS);
                }
            };
            print_principals(&out, cli.json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Human(cmd) => simple(&client()?, "humans", cmd, cli.json).await,
        Command::Team(cmd) => simple(&client()?, "teams", cmd, cli.json).await,
        Command::ServiceAccount(cmd) => simple(&client()?, "service-accounts", cmd, cli.json).await,
        Command::Keys(cmd) => {
            let c = client()?;
            let v = match cmd {
                KeysCmd::Rotate => c.call(Method::POST, "/keys/rotate", None).await?,
                KeysCmd::List => c.call(Method::GET, "/keys", None).await?,
            };
            if cli.json {
                println!("{}", pretty(&v));
            } else {
                println!("active key: {}", v["active_kid"].as_str().unwrap_or("-"));
                if let Some(keys) = v.pointer("/jwks/keys").and_then(Value::as_array) {
                    println!(
                        "keys in the JWKS: {}",
                        keys.iter()
                            .filter_map(|k| k["kid"].as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(AuditCmd::Tail { limit, follow }) => {
            audit_tail(&client()?, limit, follow, cli.json).await
        }
        Command::Audit(AuditCmd::Verify { file, from, key }) => {
            audit_verify_export(file, &data_dir, from, key, cli.json)
        }
        Command::Audit(AuditCmd::Export { out, after }) => audit_export(&data_dir, out, after),
        Command::Audit(AuditCmd::Query {
            query,
            format,
            lists,
        }) => audit_query(&data_dir, &query, &format, &lists, cli.json),
        Command::Audit(AuditCmd::Trace { id, format }) => {
            let store = palisade_store::SqliteStore::open_existing(&data_dir)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let rows = palisade_audit::query::rows_from_store(&store)?;
            let answer = palisade_audit::query::trace(rows, &id);
            if answer.rows.is_empty() {
                eprintln!("no event has trace, request, event or principal id `{id}`");
                return Ok(ExitCode::FAILURE);
            }
            let format = if cli.json { "json" } else { format.as_str() };
            print!("{}", palisade_audit::query::render(&answer, format));
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(AuditCmd::Prune) => {
            let v = client()?.call(Method::POST, "/audit/prune", None).await?;
            if cli.json {
                println!("{}", pretty(&v));
            } else if v["pruned"].is_null() {
                println!(
                    "nothing to prune: no event is older than the retention and delivered to every sink"
                );
            } else {
                let p = &v["pruned"];
                println!(
                    "archived and pruned events {}..{} to {} (sealed by a checkpoint of event {}; verify it with `palisade audit verify FILE`)",
                    cell(&p["first_seq"]),
                    cell(&p["last_seq"]),
                    cell(&p["archive"]),
                    cell(&p["last_seq"])
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(AuditCmd::Sinks) => {
            let v = client()?.call(Method::GET, "/audit/sinks", None).await?;
            if cli.json {
                println!("{}", pretty(&v));
                return Ok(ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = v["sinks"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|s| {
                    vec![
                        cell(&s["name"]),
                        format!("{}/{}", cell(&s["kind"]), cell(&s["format"])),
                        cell(&s["target"]),
                        if s["required"] == true { "yes" } else { "no" }.into(),
                        cell(&s["delivered_seq"]),
                        cell(&s["lag"]),
                        s["last_error"].as_str().unwrap_or("ok").to_string(),
                    ]
                })
                .collect();
            if rows.is_empty() {
                println!("no sinks configured ([[audit.sinks]] in the config)");
            } else {
                print_table(
                    &[
                        "SINK",
                        "KIND",
                        "TARGET",
                        "REQUIRED",
                        "DELIVERED",
                        "LAG",
                        "STATE",
                    ],
                    &rows,
                );
            }
            if let Some(reason) = v["refusing"].as_str() {
                println!("REFUSING REQUESTS (fail-closed): {reason}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(AuditCmd::Checkpoint) => {
            let v = client()?
                .call(Method::POST, "/audit/checkpoints", None)
                .await?;
            println!("{}", pretty(&v));
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(cmd) => policy(cmd, &client, cli.json).await,
        Command::Owner(OwnerCmd::Kill { id, why }) => {
            let v = kill(&client()?, &format!("/owners/{id}/kill"), why).await?;
            print_kill(&v, cli.json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Alerts { cmd } => {
            let c = client()?;
            let (items, empty) = match cmd.unwrap_or(AlertsCmd::List { limit: 50 }) {
                AlertsCmd::List { limit } => {
                    let v = c
                        .call(Method::GET, &format!("/alerts?limit={limit}"), None)
                        .await?;
                    (v["items"].clone(), "no alerts")
                }
                AlertsCmd::Run => {
                    let v = c.call(Method::POST, "/alerts/run", None).await?;
                    (v["raised"].clone(), "no new alerts")
                }
            };
            if cli.json {
                println!("{}", pretty(&items));
            } else if items.as_array().is_none_or(|a| a.is_empty()) {
                println!("{empty}");
            } else {
                for a in items.as_array().into_iter().flatten() {
                    let who = a["row"]["agent_id"].as_str().unwrap_or("-");
                    println!(
                        "{:<8} {:<30} {:<24} {}",
                        a["severity"].as_str().unwrap_or(""),
                        a["rule"].as_str().unwrap_or(""),
                        who,
                        a["message"].as_str().unwrap_or("")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Secret(cmd) => {
            let c = client()?;
            let v = match cmd {
                SecretCmd::Put {
                    name,
                    description,
                    value_file,
                    from_env,
                } => {
                    let raw = match (value_file, from_env) {
                        (Some(path), _) => std::fs::read_to_string(&path)
                            .with_context(|| format!("cannot read {}", path.display()))?,
                        (None, Some(var)) => std::env::var(&var).with_context(|| {
                            format!("environment variable `{var}` is not set (or not UTF-8)")
                        })?,
                        (None, None) => {
                            use std::io::{IsTerminal, Read};
                            if std::io::stdin().is_terminal() {
                                eprintln!(
                                    "reading the value of {name} from standard input; end it with Ctrl-D (or pipe it in, or use --value-file)"
                                );
                            }
                            let mut text = String::new();
                            std::io::stdin()
                                .read_to_string(&mut text)
                                .context("cannot read the value from standard input")?;
                            text
                        }
                    };
                    // One trailing newline (from `echo` or a file) is not part of the value.
                    let value = raw
                        .strip_suffix('\n')
                        .map(|v| v.strip_suffix('\r').unwrap_or(v))
                        .unwrap_or(&raw);
                    if value.is_empty() {
                        bail!("the value is empty; pipe it in, or give --value-file or --from-env");
                    }
                    let mut body = json!({ "value": value });
                    if let Some(d) = description {
                        body["description"] = json!(d);
                    }
                    c.call(Method::PUT, &format!("/secrets/{name}"), Some(body))
                        .await?
                }
                SecretCmd::GetMetadata { name } => {
                    c.call(Method::GET, &format!("/secrets/{name}"), None)
                        .await?
                }
                SecretCmd::List => {
                    let v = c.call(Method::GET, "/secrets", None).await?;
                    if !cli.json {
                        let rows: Vec<Vec<String>> = v["items"]
                            .as_array()
                            .map(Vec::as_slice)
                            .unwrap_or_default()
                            .iter()
                            .map(|s| {
                                vec![
                                    cell(&s["name"]),
                                    cell(&s["version"]),
                                    cell(&s["master_key_id"]),
                                    cell(&s["description"]),
                                ]
                            })
                            .collect();
                        print_table(&["NAME", "VERSION", "MASTER KEY", "DESCRIPTION"], &rows);
                        return Ok(ExitCode::SUCCESS);
                    }
                    v
                }
                SecretCmd::Delete { name } => {
                    c.call(Method::DELETE, &format!("/secrets/{name}"), None)
                        .await?;
                    println!("deleted {name}");
                    return Ok(ExitCode::SUCCESS);
                }
            };
            println!("{}", pretty(&v));
            Ok(ExitCode::SUCCESS)
        }
        Command::Approvals(cmd) => approvals(cmd, &cli.addr, &client, cli.json).await,
        Command::Vault(VaultCmd::RotateMaster) => {
            let v = client()?
                .call(Method::POST, "/vault/rotate-master", None)
                .await?;
            if cli.json {
                println!("{}", pretty(&v));
            } else {
                println!(
                    "master key {} replaced by {}; {} secret(s) rewrapped",
                    cell(&v["previous_master_key_id"]),
                    cell(&v["master_key_id"]),
                    cell(&v["rewrapped"])
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Mcp(cmd) => {
            let c = client()?;
            match cmd {
                McpCmd::Pins => {
                    let v = c.call(Method::GET, "/mcp/pins", None).await?;
                    if cli.json {
                        println!("{}", pretty(&v));
                    } else {
                        let rows: Vec<Vec<String>> = v["items"]
                            .as_array()
                            .map(Vec::as_slice)
                            .unwrap_or_default()
                            .iter()
                            .map(|p| {
                                vec![
                                    cell(&p["tool"]),
                                    p["pinned_sha256"]
                                        .as_str()
                                        .unwrap_or("-")
                                        .chars()
                                        .take(16)
                                        .collect(),
                                    if p["changed"] == true {
                                        "CHANGED".into()
                                    } else {
                                        "same".into()
                                    },
                                    p["current_sha256"].as_str().unwrap_or("-").to_string(),
                                ]
                            })
                            .collect();
                        print_table(&["TOOL", "PINNED", "NOW", "CURRENT SHA256"], &rows);
                    }
                }
                McpCmd::Accept { tool, sha256 } => {
                    let Some((server, name)) = tool.split_once('/') else {
                        bail!("give the tool as <server>/<tool>, e.g. git/git_log");
                    };
                    let v = c
                        .call(
                            Method::POST,
                            &format!("/mcp/pins/{server}/{name}/accept"),
                            Some(json!({ "sha256": sha256 })),
                        )
                        .await?;
                    if cli.json {
                        println!("{}", pretty(&v));
                    } else {
                        println!(
                            "{tool} pinned to its current definition ({})",
                            v["pinned_sha256"].as_str().unwrap_or("-")
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Panic(why) => {
            let v = kill(&client()?, "/panic", why).await?;
            print_kill(&v, cli.json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Session(cmd) => {
            let c = client()?;
            match cmd {
                SessionCmd::List { agent } => {
                    let path = match agent {
                        Some(a) => format!(
                            "/sessions?principal={}",
                            form_urlencoded::byte_serialize(a.as_bytes()).collect::<String>()
                        ),
                        None => "/sessions".into(),
                    };
                    let v = c.call(Method::GET, &path, None).await?;
                    if cli.json {
                        println!("{}", pretty(&v));
                    } else {
                        let rows: Vec<Vec<String>> = v["items"]
                            .as_array()
                            .map(Vec::as_slice)
                            .unwrap_or_default()
                            .iter()
                            .map(|s| {
                                vec![
                                    cell(&s["sid"]),
                                    cell(&s["principal"]),
                                    cell(&s["started_at"]),
                                    cell(&s["hard_end"]),
                                    cell(&s["counters"]["calls"]),
                                    cell(&s["counters"]["objects_read"]),
                                ]
                            })
                            .collect();
                        print_table(
                            &[
                                "SESSION", "AGENT", "STARTED", "HARD END", "CALLS", "OBJECTS",
                            ],
                            &rows,
                        );
                    }
                }
                SessionCmd::Show { sid } => {
                    let v = c
                        .call(Method::GET, &format!("/sessions/{sid}"), None)
                        .await?;
                    println!("{}", pretty(&v));
                }
                SessionCmd::End { sid, reason } => {
                    let body = strip_nulls(json!({ "reason": reason }));
                    let v = c
                        .call(Method::POST, &format!("/sessions/{sid}/end"), Some(body))
                        .await?;
                    if cli.json {
                        println!("{}", pretty(&v));
                    } else {
                        println!("session {sid} ended; the agent must clear its context");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCmd::Check { file }) => match check_config(&file) {
            Ok(summary) => {
                println!("{summary}");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("error: {e}");
                Ok(ExitCode::from(EXIT_CONFIG))
            }
        },
    }
}

/// The engine for `--dir` (policies only) or `--config` (its policy directory and the purposes
/// it declares); the exit code on failure is 64 for unusable input, 1 for invalid policies.
fn engine_for(source: &PolicySource) -> Result<palisade_policy::PolicyEngine, (u8, String)> {
    match (&source.dir, &source.config) {
        (Some(_), Some(_)) => Err((EXIT_CONFIG, "give --dir or --config, not both".into())),
        (Some(dir), None) => {
            palisade_policy::PolicyEngine::load(Some(dir), &[]).map_err(|e| (1, e.to_string()))
        }
        (None, Some(file)) => {
            let config = Config::load(file).map_err(|e| (EXIT_CONFIG, e.to_string()))?;
            palisade_server::policy_engine_for(&config).map_err(|e| (1, e.to_string()))
        }
        (None, None) => {
            palisade_policy::PolicyEngine::load(None, &[]).map_err(|e| (1, e.to_string()))
        }
    }
}

async fn policy(
    cmd: PolicyCmd,
    client: &dyn Fn() -> Result<Client>,
    as_json: bool,
) -> Result<ExitCode> {
    let load = engine_for;
    match cmd {
        PolicyCmd::Validate(source) => match load(&source) {
            Ok(engine) => {
                println!(
                    "valid: {} policies, version {}",
                    engine.policy_count(),
                    engine.version()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err((code, e)) => {
                eprintln!("error: {e}");
                Ok(ExitCode::from(code))
            }
        },
        PolicyCmd::Test { file, source } => {
            let engine = match load(&source) {
                Ok(e) => e,
                Err((code, e)) => {
                    eprintln!("error: {e}");
                    return Ok(ExitCode::from(code));
                }
            };
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let results =
                match palisade_policy::cases::run(&engine, &text, &file.display().to_string()) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return Ok(ExitCode::from(EXIT_CONFIG));
                    }
                };
            let failed = results.iter().filter(|r| !r.passed).count();
            if as_json {
                let items: Vec<Value> = results
                    .iter()
                    .map(|r| json!({ "name": r.name, "passed": r.passed, "message": r.message }))
                    .collect();
                println!(
                    "{}",
                    pretty(
                        &json!({ "cases": items, "failed": failed, "policy_version": engine.version() })
                    )
                );
            } else {
                for r in &results {
                    println!(
                        "{} {}: {}",
                        if r.passed { "ok  " } else { "FAIL" },
                        r.name,
                        r.message
                    );
                }
                println!(
                    "policy cases: {} passed, {failed} failed (policy version {})",
                    results.len() - failed,
                    engine.version()
                );
            }
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        PolicyCmd::Explain {
            principal,
            action,
            route,
            resource,
        } => {
            let body = strip_nulls(
                json!({ "principal": principal, "action": action, "route": route, "resource": resource }),
            );
            let v = client()?
                .call(Method::POST, "/policy/explain", Some(body))
                .await?;
            if as_json {
                println!("{}", pretty(&v));
                return Ok(ExitCode::SUCCESS);
            }
            let verdict = if v["allowed"] == true {
                "ALLOW"
            } else {
                "DENY"
            };
            println!("{verdict} by {}", cell(&v["deciding_policies"]));
            for e in v["errors"].as_array().into_iter().flatten() {
                println!("  evaluation error: {}", cell(e));
            }
            for p in v["permits_considered"].as_array().into_iter().flatten() {
                let errors_denied = v["errors"].as_array().is_some_and(|e| !e.is_empty());
                let why = match (p["would_allow_alone"] == true, errors_denied) {
                    (true, false) => "would allow, overridden by a forbid",
                    (true, true) => "would allow; the deny came from evaluation errors or a forbid",
                    (false, _) => "did not match this request",
                };
                println!(
                    "\npermit {} ({why}):\n{}",
                    cell(&p["id"]),
                    p["text"].as_str().unwrap_or_default().trim()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCmd::WhatCan { agent } => {
            let v = client()?
                .call(Method::GET, &format!("/policy/agents/{agent}/can"), None)
                .await?;
            if as_json {
                println!("{}", pretty(&v));
                return Ok(ExitCode::SUCCESS);
            }
            let cols = ["route", "resource", "action", "allowed", "policies"];
            let rows: Vec<Vec<String>> = v["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|i| cols.iter().map(|c| cell(&i[*c])).collect())
                .collect();
            print_table(&cols, &rows);
            Ok(ExitCode::SUCCESS)
        }
        PolicyCmd::Show { agent } => {
            let v = client()?
                .call(Method::GET, &format!("/policy/agents/{agent}"), None)
                .await?;
            if as_json {
                println!("{}", pretty(&v));
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "agent              {} ({})",
                cell(&v["agent"]),
                cell(&v["status"])
            );
            println!("purpose            {}", cell(&v["purpose_tag"]));
            println!("allowed routes     {}", cell(&v["allowed_resources"]));
            let b = &v["blast_radius"];
            println!("systems            {}", cell(&b["systems"]));
            println!("max classification {}", cell(&b["max_classification"]));
            println!("max action         {}", cell(&b["max_action"]));
            println!("hours (UTC)        {}", cell(&b["hours"]));
            println!("weekdays           {}", cell(&b["weekdays"]));
            println!("egress to          {}", cell(&b["egress_destinations"]));
            println!("policy version     {}\n", cell(&v["policy_version"]));
            for p in v["policies"].as_array().into_iter().flatten() {
                println!("{}\n", p["text"].as_str().unwrap_or_default().trim());
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCmd::Status | PolicyCmd::Reload => {
            let c = client()?;
            let v = match cmd {
                PolicyCmd::Reload => c.call(Method::POST, "/policy/reload", None).await?,
                _ => c.call(Method::GET, "/policy", None).await?,
            };
            if as_json {
                println!("{}", pretty(&v));
            } else {
                println!("version   {}", cell(&v["version"]));
                println!(
                    "policies  {}",
                    v["policies"].as_array().map(Vec::len).unwrap_or(0)
                );
                println!("dir       {}", cell(&v["dir"]));
                println!("loaded at {}", cell(&v["loaded_at"]));
                if let Some(changed) = v.get("changed") {
                    println!("changed   {}", cell(changed));
                }
                if let Some(err) = v.get("last_reload_error").filter(|e| !e.is_null()) {
                    println!(
                        "last reload failed at {}; the version above stays in force:",
                        cell(&err["at"])
                    );
                    for e in err["errors"].as_array().into_iter().flatten() {
                        println!("  {}", cell(e));
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn check_config(file: &std::path::Path) -> Result<String, String> {
    let config = Config::load(file).map_err(|e| e.to_string())?;
    let engine = palisade_server::policy_engine_for(&config).map_err(|e| e.to_string())?;
    Ok(format!(
        "{}: valid ({} routes, {} policies, policy version {})",
        file.display(),
        config.routes.len(),
        engine.policy_count(),
        engine.version()
    ))
}

async fn serve(args: ServeArgs, data_dir: Option<PathBuf>) -> Result<ExitCode> {
    init_tracing();
    let listen = args
        .listen
        .clone()
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let mut options = palisade_server::StartOptions::default();
    let mut demo_upstream = String::from("-");
    let config = if args.demo && args.config.is_none() {
        let upstream = palisade_server::demo::start_upstream()
            .await
            .context("cannot start the demo upstream")?;
        demo_upstream = format!("http://{upstream}");
        let dir = data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("./palisade-data"));
        options.extra_policies.push((
            "<demo policy>".into(),
            palisade_server::demo::DEMO_POLICY.into(),
        ));
        match palisade_server::demo::config(&listen, &dir.display().to_string(), upstream) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
        }
    } else {
        let file = args
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from("palisade.toml"));
        let mut config = match Config::load(&file) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                if args.config.is_none() {
                    eprintln!(
                        "hint: pass --config FILE, or run `palisade serve --demo` to try Palisade"
                    );
                }
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
        };
        if let Some(l) = &args.listen {
            config.server.listen = match l.parse() {
                Ok(a) => a,
                Err(_) => {
                    eprintln!("error: --listen `{l}` is not an address; write e.g. 127.0.0.1:8080");
                    return Ok(ExitCode::from(EXIT_CONFIG));
                }
            };
        }
        if let Some(d) = data_dir {
            config.server.data_dir = d;
        }
        if args.demo {
            options.extra_policies.push((
                "<demo policy>".into(),
                palisade_server::demo::DEMO_POLICY.into(),
            ));
        }
        config
    };
    let data_dir_text = config.server.data_dir.display().to_string();
    let server = match palisade_server::start(config, options).await {
        Ok(s) => s,
        Err(e @ palisade_server::StartError::Policy(_)) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
        Err(e) => bail!(e),
    };
    if args.demo {
        let secret = palisade_server::demo::seed(&server.app)
            .await
            .map_err(anyhow::Error::msg)?;
        println!(
            "{}",
            palisade_server::demo::instructions(
                &server.url(),
                &secret,
                &data_dir_text,
                &demo_upstream
            )
        );
    } else {
        println!(
            "palisade listening on {} (admin token in {})",
            server.url(),
            server.admin_token_path.display()
        );
    }
    server.wait().await;
    Ok(ExitCode::SUCCESS)
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PALISADE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn kill(c: &Client, path: &str, why: KillArgs) -> Result<Value> {
    let body = strip_nulls(json!({ "reason": why.reason, "operator": why.operator }));
    c.call(Method::POST, path, Some(body)).await
}

fn print_kill(v: &Value, as_json: bool) {
    if as_json {
        println!("{}", pretty(v));
        return;
    }
    let count = |k: &str| v[k].as_array().map(Vec::len).unwrap_or(0);
    println!(
        "kill switch ({} {}): {} session(s) ended, {} agent(s) suspended",
        v["scope"].as_str().unwrap_or("-"),
        v["target"].as_str().unwrap_or("-"),
        count("sessions_ended"),
        count("suspended")
    );
    if let Some(note) = v["note"].as_str() {
        println!("{note}");
    }
}

async fn lifecycle(c: &Client, collection: &str, verb: &str, l: Lifecycle) -> Result<Value> {
    c.call(
        Method::POST,
        &format!("/{collection}/{}/{verb}", l.id),
        Some(json!({ "reason": l.reason })),
    )
    .await
}

async fn simple<F: Args + Fields>(
    c: &Client,
    collection: &str,
    cmd: SimpleCmd<F>,
    as_json: bool,
) -> Result<ExitCode> {
    let out = match cmd {
        SimpleCmd::Add { id, fields } => {
            let mut body = fields.to_json();
            body.insert("id".into(), json!(id));
            let v = c
                .call(
                    Method::POST,
                    &format!("/{collection}"),
                    Some(Value::Object(body)),
                )
                .await?;
            print_created(&v, as_json);
            return Ok(ExitCode::SUCCESS);
        }
        SimpleCmd::List => c.call(Method::GET, &format!("/{collection}"), None).await?,
        SimpleCmd::Show { id } => {
            c.call(Method::GET, &format!("/{collection}/{id}"), None)
                .await?
        }
        SimpleCmd::Update { id, set } => {
            let patch: Value = serde_json::from_str(&set)
                .context("--set must be a JSON object, e.g. '{\"email\":\"a@example.com\"}'")?;
            c.call(Method::PATCH, &format!("/{collection}/{id}"), Some(patch))
                .await?
        }
        SimpleCmd::Suspend(l) => lifecycle(c, collection, "suspend", l).await?,
        SimpleCmd::Resume(l) => lifecycle(c, collection, "resume", l).await?,
        SimpleCmd::Deprovision(l) => lifecycle(c, collection, "deprovision", l).await?,
    };
    print_principals(&out, as_json);
    Ok(ExitCode::SUCCESS)
}

fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.into_iter().filter(|(_, v)| !v.is_null()).collect()),
        other => other,
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn print_created(v: &Value, as_json: bool) {
    if as_json {
        println!("{}", pretty(v));
        return;
    }
    let p = &v["principal"];
    println!(
        "registered {} ({})",
        p["id"].as_str().unwrap_or("?"),
        p["display_name"].as_str().unwrap_or("")
    );
    if let Some(c) = v.get("credentials") {
        println!("client_id:     {}", c["client_id"].as_str().unwrap_or(""));
        println!(
            "client_secret: {}",
            c["client_secret"].as_str().unwrap_or("")
        );
        println!("Store the secret now: it is shown only once.");
    }
}

async fn approvals(
    cmd: ApprovalsCmd,
    addr: &str,
    client: &dyn Fn() -> Result<Client>,
    json: bool,
) -> Result<ExitCode> {
    // The approver's token comes only from the environment, never the command line (shell
    // history, `ps`).
    let approver = std::env::var("PALISADE_APPROVER_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty());
    let reader = || match &approver {
        Some(t) => Client::with_token(addr, t.trim()),
        None => client(),
    };
    let decide = |id: &str, verb: &str, reason: Option<String>| {
        let token = approver.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "deciding needs your approver token in PALISADE_APPROVER_TOKEN; an administrator mints it with `palisade approvals token human:NAME`. The admin token cannot approve: it names no human"
            )
        })?;
        let c = Client::with_token(addr, token.trim())?;
        Ok::<_, anyhow::Error>((
            c,
            format!("/approvals/{id}/{verb}"),
            json!({ "reason": reason }),
        ))
    };
    let v = match cmd {
        ApprovalsCmd::List { status, limit } => {
            let v = reader()?
                .call(
                    Method::GET,
                    &format!("/approvals?status={status}&limit={limit}"),
                    None,
                )
                .await?;
            if json {
                println!("{}", pretty(&v));
                return Ok(ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = v["items"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|a| {
                    vec![
                        cell(&a["id"]),
                        cell(&a["status"]),
                        cell(&a["agent"]),
                        format!("{} {}", cell(&a["method"]), cell(&a["target"])),
                        format!("{}/{}", cell(&a["approved"]), cell(&a["rule"]["count"])),
                        cell(&a["requested_at"]),
                    ]
                })
                .collect();
            if rows.is_empty() {
                println!("no {status} approvals");
            } else {
                print_table(
                    &["ID", "STATUS", "AGENT", "ACTION", "APPROVED", "REQUESTED"],
                    &rows,
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        ApprovalsCmd::Show { id } => {
            reader()?
                .call(Method::GET, &format!("/approvals/{id}"), None)
                .await?
        }
        ApprovalsCmd::Approve { id, reason } => {
            let (c, path, body) = decide(&id, "approve", reason)?;
            c.call(Method::POST, &path, Some(body)).await?
        }
        ApprovalsCmd::Deny { id, reason } => {
            let (c, path, body) = decide(&id, "deny", Some(reason))?;
            c.call(Method::POST, &path, Some(body)).await?
        }
        ApprovalsCmd::Token { human } => {
            let v = client()?
                .call(
                    Method::POST,
                    &format!("/humans/{human}/token?for=approvals"),
                    None,
                )
                .await?;
            if json {
                println!("{}", pretty(&v));
            } else {
                println!("{}", v["access_token"].as_str().unwrap_or(""));
                eprintln!(
                    "approver token for {human}, valid {}s: give it to them only (export PALISADE_APPROVER_TOKEN=...)",
                    cell(&v["expires_in"])
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    if json {
        println!("{}", pretty(&v));
        return Ok(ExitCode::SUCCESS);
    }
    println!("approval   {}", cell(&v["id"]));
    println!("status     {}", cell(&v["status"]));
    println!("agent      {}", cell(&v["agent"]));
    if !v["initiating_human"].is_null() {
        println!("for human  {}", cell(&v["initiating_human"]));
    }
    let query = v["query"]
        .as_str()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    println!(
        "action     {} {}{query} ({}, {})",
        cell(&v["method"]),
        cell(&v["target"]),
        cell(&v["action"]),
        cell(&v["resource"])
    );
    println!(
        "body       sha256 {} ({} bytes)",
        cell(&v["body_sha256"]),
        cell(&v["body_bytes"])
    );
    if let Some(p) = v["preview"].as_str() {
        let cut = if v["preview_truncated"] == true {
            " [cut short; the digest covers the whole body]"
        } else {
            ""
        };
        println!("preview    {p}{cut}");
    }
    if let Some(r) = v["reasoning"].as_str() {
        println!("reasoning  {r}");
    }
    println!(
        "approvers  {} ({} of {} approved; four eyes: {})",
        cell(
            &v["rule"]["approvers"]
                .as_array()
                .map(|a| Value::from(
                    a.iter()
                        .map(|x| match (x["kind"].as_str(), x["id"].as_str()) {
                            (_, Some(id)) => id.to_string(),
                            (Some(k), None) => k.to_string(),
                            _ => "-".to_string(),
                        })
                        .collect::<Vec<_>>()
                ))
                .unwrap_or_default()
        ),
        cell(&v["approved"]),
        cell(&v["rule"]["count"]),
        cell(&v["rule"]["four_eyes"])
    );
    for vote in v["votes"].as_array().map(Vec::as_slice).unwrap_or_default() {
        println!(
            "decision   {} {} at {}: {}",
            cell(&vote["approver"]),
            if vote["approve"] == true {
                "approved"
            } else {
                "denied"
            },
            cell(&vote["at"]),
            cell(&vote["reason"])
        );
    }
    println!(
        "expires    {}",
        palisade_core::Timestamp::from_unix_seconds(v["expires_at"].as_i64().unwrap_or(0))
    );
    println!("link       {}", cell(&v["link"]));
    Ok(ExitCode::SUCCESS)
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Prints a table of principals (a list response) or the fields of one.
fn print_principals(v: &Value, as_json: bool) {
    if as_json {
        println!("{}", pretty(v));
        return;
    }
    match v.get("items").and_then(Value::as_array) {
        Some(items) => {
            let cols = [
                "id",
                "status",
                "owner",
                "purpose_tag",
                "model",
                "next_review_at",
            ];
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|i| cols.iter().map(|c| cell(&i[*c])).collect())
                .collect();
            print_table(&cols, &rows);
        }
        None => {
            if let Some(map) = v.as_object() {
                let width = map.keys().map(String::len).max().unwrap_or(0);
                for (k, val) in map {
                    println!("{k:width$}  {}", cell(val));
                }
            }
        }
    }
}

fn print_table(cols: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(String::len)
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(cols.iter().map(|c| c.to_uppercase()).collect());
    for r in rows {
        line(r.clone());
    }
}

async fn audit_tail(c: &Client, limit: usize, follow: bool, as_json: bool) -> Result<ExitCode> {
    let limit = limit.clamp(1, 1000);
    // Find the head by paging, then show the last `limit`.
    let mut after = 0u64;
    let mut last: Vec<Value> = Vec::new();
    loop {
        let v = c
            .call(
                Method::GET,
                &format!("/audit/events?after={after}&limit=1000"),
                None,
            )
            .await?;
        let items = v["items"].as_array().cloned().unwrap_or_default();
        if items.is_empty() {
            break;
        }
        after = items
            .last()
            .and_then(|i| i["seq"].as_u64())
            .unwrap_or(after);
        last.extend(items);
        if last.len() > limit {
            last.drain(..last.len() - limit);
        }
    }
    for item in &last {
        print_event(item, as_json);
    }
    if !follow {
        return Ok(ExitCode::SUCCESS);
    }
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let v = c
            .call(
                Method::GET,
                &format!("/audit/events?after={after}&limit=1000"),
                None,
            )
            .await?;
        for item in v["items"].as_array().cloned().unwrap_or_default() {
            after = item["seq"].as_u64().unwrap_or(after);
            print_event(&item, as_json);
        }
    }
}

fn print_event(item: &Value, as_json: bool) {
    if as_json {
        println!("{}", serde_json::to_string(item).unwrap_or_default());
        return;
    }
    let e = &item["event"];
    let time = e["time_ns"]
        .as_i64()
        .map(|n| palisade_core::Timestamp::from_unix_nanos(i128::from(n)).to_rfc3339())
        .unwrap_or_default();
    let decision = match e.pointer("/decision/allowed").and_then(Value::as_bool) {
        Some(true) => format!("ALLOW {}", cell(&e["decision"]["policies"])),
        Some(false) => format!("DENY {}", cell(&e["decision"]["policies"])),
        None => String::new(),
    };
    let status = e.pointer("/outcome/status").map(cell).unwrap_or_default();
    println!(
        "{:>6} {} {:<16} {:<26} {:<12} {:<28} {} {}",
        cell(&item["seq"]),
        time,
        cell(&e["kind"]),
        e.pointer("/principal/id")
            .map(cell)
            .unwrap_or_else(|| "-".into()),
        cell(&e["action"]),
        cell(&e["resource"]),
        status,
        decision
    );
}

fn audit_query(
    data_dir: &std::path::Path,
    query: &str,
    format: &str,
    lists: &[String],
    as_json: bool,
) -> Result<ExitCode> {
    let format = if as_json { "json" } else { format };
    if !matches!(format, "table" | "json" | "csv") {
        bail!("--format `{format}` is not table, json or csv");
    }
    let mut named = std::collections::HashMap::new();
    for l in lists {
        let Some((name, values)) = l.split_once('=') else {
            bail!("--list `{l}` must look like NAME=a,b,c");
        };
        named.insert(
            name.trim().to_string(),
            values
                .split(',')
                .filter(|v| !v.is_empty())
                .map(|v| json!(v.trim()))
                .collect(),
        );
    }
    let store =
        palisade_store::SqliteStore::open_existing(data_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let now = i64::try_from(palisade_core::Timestamp::now().unix_nanos()).unwrap_or(i64::MAX);
    match palisade_audit::query::run_on_store(query, &store, now, &named) {
        Ok(out) => {
            print!("{}", palisade_audit::query::render(&out, format));
            Ok(ExitCode::SUCCESS)
        }
        Err(palisade_audit::query::StoreQueryError::Store(e)) => Err(e.into()),
        Err(palisade_audit::query::StoreQueryError::Query(e)) => {
            // Show the line of the query with a caret under the offending token.
            let before: String = query.chars().take(e.column.saturating_sub(1)).collect();
            let line_no = before.matches('\n').count();
            let col_in_line = before.rsplit('\n').next().unwrap_or("").chars().count();
            let line = query.lines().nth(line_no).unwrap_or(query);
            eprintln!("error: {e}");
            eprintln!("  {line}");
            eprintln!("  {}^", " ".repeat(col_in_line));
            Ok(ExitCode::from(EXIT_CONFIG))
        }
    }
}

fn audit_export(data_dir: &std::path::Path, out: Option<PathBuf>, after: u64) -> Result<ExitCode> {
    let store =
        palisade_store::SqliteStore::open_existing(data_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let count = match &out {
        Some(path) => {
            let tmp = path.with_extension("partial");
            let mut file = std::io::BufWriter::new(
                std::fs::File::create(&tmp)
                    .with_context(|| format!("cannot create {}", tmp.display()))?,
            );
            let n = palisade_audit::checkpoint::export(&store, after, &mut file)?;
            use std::io::Write;
            file.flush()
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            drop(file);
            std::fs::rename(&tmp, path)
                .with_context(|| format!("cannot move the export to {}", path.display()))?;
            n
        }
        None => {
            let mut stdout = std::io::stdout().lock();
            palisade_audit::checkpoint::export(&store, after, &mut stdout)?
        }
    };
    eprintln!("exported {count} events");
    Ok(ExitCode::SUCCESS)
}

fn audit_verify_export(
    file: Option<PathBuf>,
    data_dir: &std::path::Path,
    from: Option<PathBuf>,
    key: Option<String>,
    as_json: bool,
) -> Result<ExitCode> {
    let from = match &from {
        Some(path) => {
            let json = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Some(
                serde_json::from_str::<palisade_audit::checkpoint::Checkpoint>(&json)
                    .with_context(|| {
                        format!(
                            "{} is not a checkpoint (save the output of `palisade audit checkpoint`)",
                            path.display()
                        )
                    })?,
            )
        }
        None => None,
    };
    let verified = match &file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            palisade_audit::checkpoint::verify_export(&text, from.as_ref(), key.as_deref())
        }
        None => {
            let store = palisade_store::SqliteStore::open_existing(data_dir)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            palisade_audit::checkpoint::verify_store(&store, from.as_ref(), key.as_deref())
        }
    };
    match verified {
        Ok(report) => {
            if as_json {
                println!("{}", json!({ "ok": true, "report": report }));
            } else {
                println!(
                    "audit chain intact: {} events up to event {}, head {}; {} signed checkpoints verified (latest at event {})",
                    report.events,
                    report.last_seq,
                    report.head_hash,
                    report.checkpoints,
                    report
                        .last_checkpoint
                        .map_or("-".to_string(), |s| s.to_string())
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if as_json {
                println!("{}", json!({ "ok": false, "reason": e.to_string() }));
            } else {
                eprintln!("{e}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}
