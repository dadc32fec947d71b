//! `palisade.toml`: raw serde types that reject unknown keys, validated into one resolved
//! [`Config`] before any port is bound.
//!
//! Stages: TOML text → [`raw`] structs (`deny_unknown_fields`, errors carry the key path) →
//! [`Config::validate`] → the resolved form every other crate reads. This crate does no I/O beyond
//! reading the file it is given.

use http::{Method, Uri};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Path prefixes the server itself serves; routes may not shadow them.
pub const RESERVED_PREFIXES: &[&str] = &[
    "/api",
    "/oauth2",
    "/.well-known",
    "/healthz",
    "/access",
    "/mcp",
];

/// Where the MCP gateway listens.
pub const MCP_PATH: &str = "/mcp";

/// A configuration problem, naming the key and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct ConfigError {
    source_name: String,
    message: String,
}

impl ConfigError {
    fn new(source_name: &str, message: impl Into<String>) -> Self {
        Self {
            source_name: source_name.to_string(),
            message: message.into(),
        }
    }
}

/// The raw shapes of the TOML file.
pub mod raw {
    use serde::Deserialize;

    /// The whole file.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct File {
        #[serde(default)]
        pub server: Server,
        #[serde(default)]
        pub oauth: OAuth,
        #[serde(default)]
        pub policy: Policy,
        #[serde(default)]
        pub gateway: Gateway,
        #[serde(default)]
        pub routes: Vec<Route>,
        #[serde(default)]
        pub authzen: AuthZen,
        #[serde(default)]
        pub purposes: std::collections::BTreeMap<String, Purpose>,
        #[serde(default)]
        pub mcp: Mcp,
        #[serde(default)]
        pub inspection: Inspection,
        #[serde(default)]
        pub audit: Audit,
        #[serde(default)]
        pub vault: Vault,
        #[serde(default)]
        pub approvals: Approvals,
    }

    /// `[approvals]`.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct Approvals {
        pub destructive: Option<bool>,
        pub approvers: Option<Vec<String>>,
        pub count: Option<u32>,
        pub grant: Option<String>,
        pub wait: Option<String>,
        pub hold: Option<String>,
        pub four_eyes: Option<bool>,
        pub uses: Option<u32>,
        pub link: Option<String>,
        #[serde(default)]
        pub webhooks: Vec<ApprovalWebhook>,
    }

    /// `[[approvals.webhooks]]`.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct ApprovalWebhook {
        pub name: String,
        pub url: String,
        pub format: Option<String>,
    }

    /// `[vault]`.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct Vault {
        pub master_key_file: Option<String>,
        pub master_key_env: Option<String>,
        #[serde(default)]
        pub databases: Vec<Database>,
    }

    /// `[[vault.databases]]`.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct Database {
        pub name: String,
        pub url: String,
        #[serde(default)]
        pub roles: std::collections::BTreeMap<String, DatabaseRole>,
    }

    /// `[vault.databases.roles.<role>]`.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct DatabaseRole {
        pub creation: Vec<String>,
        #[serde(default)]
        pub revocation: Vec<String>,
        #[serde(default)]
        pub writes: bool,
    }

    /// `[[routes.credentials]]`.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct Credential {
        pub secret: String,
        pub kind: String,
        pub name: Option<String>,
        #[serde(default)]
        pub actions: Vec<String>,
    }

    /// `[audit]`.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct Audit {
        pub rules_file: Option<String>,
        #[serde(default)]
        pub lists: std::collections::BTreeMap<String, Vec<String>>,
        #[serde(default)]
        pub sinks: Vec<Sink>,
        pub retention: Option<String>,
        pub archive_dir: Option<String>,
    }

    /// `[[audit.sinks]]`.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct Sink {
        pub name: String,
        pub kind: String,
        pub format: Option<String>,
        pub path: Option<String>,
        pub url: Option<String>,
        pub address: Option<String>,
        pub transport: Option<String>,
        #[serde(default)]
        pub headers: std::collections::BTreeMap<String, String>,
        pub ca_file: Option<String>,
        #[serde(default)]
        pub kinds: Vec<String>,
        #[serde(default)]
        pub required: bool,
        pub batch: Option<usize>,
        pub rotate_bytes: Option<u64>,
        pub keep: Option<usize>,
    }

    /// `[purposes.<tag>]`.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct Purpose {
        pub actions: Vec<String>,
        pub resource_kinds: Vec<String>,
    }

    /// `[authzen]`.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct AuthZen {
        pub namespace: Option<String>,
    }

    /// `[server]`.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct Server {
        pub listen: Option<String>,
        pub data_dir: Option<String>,
        pub issuer: Option<String>,
    }

    /// `[oauth]`.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct OAuth {
        pub access_token_ttl_minutes: Option<i64>,
        pub default_audience: Option<String>,
        pub leeway_seconds: Option<i64>,
        #[serde(default)]
        pub identity_providers: Vec<IdentityProvider>,
    }

    /// `[[oauth.identity_providers]]`.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct IdentityProvider {
        pub name: String,
        pub issuer: String,
        pub jwks_uri: String,
        pub audience: String,
        pub human_claim: Option<String>,
    }

    /// `[policy]`.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct Policy {
        pub dir: Option<String>,
    }

    /// `[gateway]`.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct Gateway {
        pub max_body_bytes: Option<u64>,
        pub upstream_timeout_seconds: Option<u64>,
        pub connect_timeout_seconds: Option<u64>,
        pub agent_rate_limit: Option<String>,
        pub max_concurrent_requests_per_agent: Option<u32>,
    }

    /// `[inspection]`.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct Inspection {
        pub max_bytes: Option<u64>,
        pub oversize: Option<String>,
        #[serde(default)]
        pub read: InspectionActions,
        #[serde(default)]
        pub send: InspectionActions,
    }

    /// `[inspection.read]`, `[inspection.send]` and their per-route and per-server overrides.
    #[derive(Debug, Default, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct InspectionActions {
        pub injection: Option<String>,
        pub hidden: Option<String>,
        pub secret: Option<String>,
        pub pii: Option<String>,
        pub exfil_indicator: Option<String>,
    }

    /// `[routes.inspection]` and `[mcp.servers.inspection]`.
    #[derive(Debug, Default, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct InspectionOverride {
        pub enabled: Option<bool>,
        #[serde(default)]
        pub read: InspectionActions,
        #[serde(default)]
        pub send: InspectionActions,
    }

    /// `[[routes]]`.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct Route {
        pub name: String,
        pub path_prefix: String,
        pub upstream: String,
        pub audience: Option<String>,
        pub kind: Option<String>,
        pub system: Option<String>,
        pub classification: Option<String>,
        #[serde(default)]
        pub strip_prefix: bool,
        pub timeout_seconds: Option<u64>,
        pub max_body_bytes: Option<u64>,
        pub max_response_bytes: Option<u64>,
        pub rate_limit: Option<String>,
        pub agent_rate_limit: Option<String>,
        pub max_objects_per_session: Option<u64>,
        pub write_scope: Option<String>,
        #[serde(default)]
        pub untrusted: bool,
        #[serde(default)]
        pub inspection: InspectionOverride,
        #[serde(default)]
        pub rules: Vec<Rule>,
        #[serde(default)]
        pub credentials: Vec<Credential>,
    }

    /// `[mcp]`.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct Mcp {
        #[serde(default)]
        pub servers: Vec<McpServer>,
    }

    /// `[[mcp.servers]]`.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct McpServer {
        pub name: String,
        pub command: Option<String>,
        pub url: Option<String>,
        #[serde(default)]
        pub args: Vec<String>,
        #[serde(default)]
        pub env: std::collections::BTreeMap<String, String>,
        pub cwd: Option<String>,
        #[serde(default)]
        pub headers: std::collections::BTreeMap<String, String>,
        pub ca_file: Option<String>,
        pub kind: Option<String>,
        pub system: Option<String>,
        pub classification: Option<String>,
        pub on_tool_change: Option<String>,
        pub write_scope: Option<String>,
        #[serde(default)]
        pub untrusted: bool,
        #[serde(default)]
        pub inspection: InspectionOverride,
        #[serde(default)]
        pub tools: std::collections::BTreeMap<String, McpTool>,
    }

    /// `[mcp.servers.tools.<tool>]`.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct McpTool {
        pub action: Option<String>,
        pub pin: Option<String>,
        pub content: Option<String>,
        #[serde(default)]
        pub arguments: std::collections::BTreeMap<String, String>,
    }

    /// `[[routes.rules]]`.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(missing_docs)]
    pub struct Rule {
        #[serde(default)]
        pub methods: Vec<String>,
        pub path: String,
        pub action: String,
        pub resource: Option<String>,
        pub kind: Option<String>,
        pub classification: Option<String>,
        #[serde(default)]
        pub object_read: bool,
    }
}

/// The resolved configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// `[server]`.
    pub server: ServerConfig,
    /// `[oauth]`.
    pub oauth: OAuthConfig,
    /// `[policy]`.
    pub policy: PolicyConfig,
    /// `[gateway]`.
    pub gateway: GatewayConfig,
    /// `[[routes]]`, longest prefix first.
    pub routes: Vec<RouteConfig>,
    /// `[authzen]`.
    pub authzen: AuthZenConfig,
    /// `[purposes.<tag>]`: what each purpose tag may do, sorted by tag.
    pub purposes: Vec<PurposeConfig>,
    /// `[mcp]`: the MCP gateway at [`MCP_PATH`].
    pub mcp: McpConfig,
    /// `[inspection]`: limits of content inspection (actions live on routes and servers).
    pub inspection: InspectionConfig,
    /// `[audit]`: detection rules and the named lists their queries use.
    pub audit: AuditConfig,
    /// `[vault]`: where the master key comes from.
    pub vault: VaultConfig,
    /// `[approvals]`: which actions wait for a human, and how.
    pub approvals: ApprovalsConfig,
}

/// `[vault]`.
#[derive(Clone, Debug, Default)]
pub struct VaultConfig {
    /// The master key file (default `<data_dir>/vault-master.key`, created `0600`).
    pub master_key_file: Option<PathBuf>,
    /// Or an environment variable holding the key (64 hex digits).
    pub master_key_env: Option<String>,
    /// The `aud` agent tokens need for the lease API: `<issuer>/vault`.
    pub audience: String,
    /// PostgreSQL databases whose login roles Palisade creates per lease.
    pub databases: Vec<DatabaseConfig>,
}

/// `[[vault.databases]]`: a PostgreSQL database with role templates.
#[derive(Clone, Debug)]
pub struct DatabaseConfig {
    /// Name in lease requests.
    pub name: String,
    /// The admin connection string (`${ENV}` read at start; `${vault:NAME}` filled in by the
    /// vault).
    pub url: Sensitive,
    /// Role templates.
    pub roles: Vec<DatabaseRoleConfig>,
}

/// `[vault.databases.roles.<role>]`.
#[derive(Clone, Debug)]
pub struct DatabaseRoleConfig {
    /// Name in lease requests.
    pub name: String,
    /// Statements that create and grant the role.
    pub creation: Vec<String>,
    /// Statements that revoke it (default: drop owned objects and the role).
    pub revocation: Vec<String>,
    /// Whether the role can change data: such leases are decided as `write` too and withheld
    /// from tainted sessions (privilege separation).
    pub writes: bool,
}

/// A credential the gateway injects into a route's upstream requests, from the vault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialConfig {
    /// The vault secret.
    pub secret: String,
    /// How it is sent.
    pub kind: CredentialKind,
    /// The action classes that get it (read and write credentials can differ).
    pub actions: Vec<ActionClass>,
}

/// How an injected credential travels upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialKind {
    /// `Authorization: Bearer <value>`.
    Bearer,
    /// A header of its own: `<name>: <value>`.
    Header(http::HeaderName),
    /// `Authorization: Basic base64(<user>:<value>)`.
    Basic(String),
    /// A query parameter `<name>=<value>`.
    Query(String),
}

/// `[approvals]`: human-in-the-loop confirmation of actions.
#[derive(Clone, Debug)]
pub struct ApprovalsConfig {
    /// Whether destructive actions need approval even when no policy asks (default true).
    pub destructive: bool,
    /// The defaults of every requirement (approvers, count, grant, four eyes).
    pub defaults: palisade_core::approval::ResolvedRule,
    /// How long a request waits for a decision before it expires, in seconds (default 1h).
    pub wait_secs: u64,
    /// How long the HTTP gateway holds a request for a decision before it answers 428 (default
    /// 0: at once).
    pub hold_secs: u64,
    /// The approve link sent with notifications; `{id}` is replaced by the approval id
    /// (default `<issuer>/api/v1/approvals/{id}`).
    pub link: String,
    /// Whether `link` was derived from the issuer (and follows the bound address).
    pub link_derived: bool,
    /// Where new requests are announced.
    pub webhooks: Vec<ApprovalWebhook>,
}

/// `[[approvals.webhooks]]`: a Slack-compatible incoming webhook.
#[derive(Clone, Debug)]
pub struct ApprovalWebhook {
    /// Name (audited instead of the URL, which is a secret for Slack).
    pub name: String,
    /// The URL (`http://` or `https://`).
    pub url: Sensitive,
}

/// Detection rules' configuration.
#[derive(Clone, Debug, Default)]
pub struct AuditConfig {
    /// A TOML file of `[[rules]]` added to the built-in ones (relative to the config file).
    pub rules_file: Option<PathBuf>,
    /// Named lists for `in (...)` in queries, e.g. `approved_credential_consumers`.
    pub lists: Vec<(String, Vec<String>)>,
    /// SIEM sinks that receive every audit event (at least once, in order).
    pub sinks: Vec<SinkConfig>,
    /// How long events stay in the store; older ones are archived, sealed and pruned (none:
    /// kept forever).
    pub retention: Option<std::time::Duration>,
    /// Where pruned segments are archived (default `<data_dir>/audit-archive`).
    pub archive_dir: Option<PathBuf>,
}

/// One SIEM sink: where the audit log is delivered, in which format.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    /// Unique name (its delivery cursor is stored under it).
    pub name: String,
    /// Where events go.
    pub target: SinkTarget,
    /// How each event is written.
    pub format: SinkFormat,
    /// Event kinds delivered (`alert.raised`, or a prefix such as `token.*`); empty: all.
    pub kinds: Vec<String>,
    /// Fail closed: while every required sink is failing, the enforcement points refuse
    /// requests (the refusals are still recorded locally and delivered later).
    pub required: bool,
    /// Most events per delivery.
    pub batch: usize,
}

impl SinkConfig {
    /// Whether events of `kind` go to this sink.
    pub fn wants(&self, kind: &str) -> bool {
        self.kinds.is_empty()
            || self.kinds.iter().any(|k| match k.strip_suffix('*') {
                Some(prefix) => kind.starts_with(prefix),
                None => k == kind,
            })
    }
}

/// Where a sink delivers.
#[derive(Clone, Debug)]
pub enum SinkTarget {
    /// Appends lines to a file, rotated by size.
    File {
        /// The file.
        path: PathBuf,
        /// Size from which the file is rotated (`path.1`, `path.2`, ...).
        rotate_bytes: u64,
        /// Rotated files kept.
        keep: usize,
    },
    /// POSTs batches to an HTTP endpoint (Splunk HEC, a webhook, a log collector).
    Http {
        /// The endpoint.
        url: Uri,
        /// Sent with every request (the collector's credential).
        headers: Vec<(http::HeaderName, Sensitive)>,
        /// PEM roots instead of the public ones.
        ca_file: Option<PathBuf>,
    },
    /// Syslog (RFC 5424) to a collector.
    Syslog {
        /// `host:port`.
        address: String,
        /// UDP (RFC 5426), TCP (RFC 6587 octet counting) or TLS (RFC 5425).
        transport: SyslogTransport,
        /// PEM roots for TLS instead of the public ones.
        ca_file: Option<PathBuf>,
    },
}

/// Syslog transports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyslogTransport {
    /// One datagram per event.
    Udp,
    /// Octet-counted frames over TCP.
    Tcp,
    /// Octet-counted frames over TLS.
    Tls,
}

/// How a sink writes each event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkFormat {
    /// The event as stored, with its chain position (`seq`, `hash`).
    Json,
    /// OCSF 1.x (API Activity, Authentication, Authorize Session, Detection Finding).
    Ocsf,
    /// Splunk HTTP Event Collector envelopes.
    Hec,
    /// OpenTelemetry OTLP/HTTP JSON log records.
    Otlp,
    /// RFC 5424 with the event as JSON.
    Syslog,
    /// RFC 5424 carrying ArcSight CEF.
    Cef,
}

impl SinkFormat {
    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Ocsf => "ocsf",
            Self::Hec => "hec",
            Self::Otlp => "otlp",
            Self::Syslog => "rfc5424",
            Self::Cef => "cef",
        }
    }
}

/// Content inspection limits.
#[derive(Clone, Debug)]
pub struct InspectionConfig {
    /// Largest textual body inspected.
    pub max_bytes: u64,
    /// Whether a textual body over `max_bytes` is passed on uninspected (else refused).
    pub pass_oversize: bool,
}

/// What to do with content in which inspection found something of one category.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InspectAction {
    /// Pass it on; the audit event records the findings.
    Allow,
    /// Pass it on with the findings attached (a `Palisade-Findings` header, MCP `_meta`).
    Annotate,
    /// Pass it on with hidden content stripped and secrets and PII masked (annotated too).
    Sanitize,
    /// Refuse it.
    Block,
    /// Pass it on annotated, and taint the session (as an injection always does).
    Taint,
}

impl InspectAction {
    /// Parses `allow`, `annotate`, `sanitize`, `block` or `taint`.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "allow" => Self::Allow,
            "annotate" => Self::Annotate,
            "sanitize" => Self::Sanitize,
            "block" => Self::Block,
            "taint" => Self::Taint,
            _ => return None,
        })
    }

    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Annotate => "annotate",
            Self::Sanitize => "sanitize",
            Self::Block => "block",
            Self::Taint => "taint",
        }
    }
}

/// One action per finding category.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InspectActions {
    /// Prompt injection.
    pub injection: InspectAction,
    /// Hidden content that does not instruct.
    pub hidden: InspectAction,
    /// Credentials and keys.
    pub secret: InspectAction,
    /// Personal data.
    pub pii: InspectAction,
    /// Bulk encoded data.
    pub exfil_indicator: InspectAction,
}

/// Inspection of one route or MCP server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InspectionPolicy {
    /// Whether its content is inspected at all.
    pub enabled: bool,
    /// Whether its content taints the session that reads it.
    pub untrusted: bool,
    /// On what agents read from it (responses, tool results).
    pub read: InspectActions,
    /// On what agents send to it (request bodies, tool arguments).
    pub send: InspectActions,
}

impl InspectionPolicy {
    /// The defaults: read content has hidden content and secrets stripped (injections
    /// sanitized, which also taints), PII annotated; sent content with secrets, PII or bulk
    /// blobs is refused.
    pub const DEFAULT: Self = Self {
        enabled: true,
        untrusted: false,
        read: InspectActions {
            injection: InspectAction::Sanitize,
            hidden: InspectAction::Allow,
            secret: InspectAction::Sanitize,
            pii: InspectAction::Annotate,
            exfil_indicator: InspectAction::Allow,
        },
        send: InspectActions {
            injection: InspectAction::Annotate,
            hidden: InspectAction::Allow,
            secret: InspectAction::Block,
            pii: InspectAction::Block,
            exfil_indicator: InspectAction::Block,
        },
    };
}

fn inspect_actions(
    at: &str,
    base: InspectActions,
    raw: &raw::InspectionActions,
) -> Result<InspectActions, String> {
    let one = |key: &str, given: &Option<String>, default: InspectAction| match given {
        None => Ok(default),
        Some(v) => InspectAction::parse(v).ok_or_else(|| {
            format!("key `{at}.{key}`: `{v}` is not one of allow, annotate, sanitize, block, taint")
        }),
    };
    Ok(InspectActions {
        injection: one("injection", &raw.injection, base.injection)?,
        hidden: one("hidden", &raw.hidden, base.hidden)?,
        secret: one("secret", &raw.secret, base.secret)?,
        pii: one("pii", &raw.pii, base.pii)?,
        exfil_indicator: one(
            "exfil_indicator",
            &raw.exfil_indicator,
            base.exfil_indicator,
        )?,
    })
}

fn inspection_policy(
    at: &str,
    base: &InspectionPolicy,
    untrusted: bool,
    raw: &raw::InspectionOverride,
) -> Result<InspectionPolicy, String> {
    Ok(InspectionPolicy {
        enabled: raw.enabled.unwrap_or(base.enabled),
        untrusted,
        read: inspect_actions(&format!("{at}.inspection.read"), base.read, &raw.read)?,
        send: inspect_actions(&format!("{at}.inspection.send"), base.send, &raw.send)?,
    })
}

/// The MCP gateway.
#[derive(Clone, Debug, Default)]
pub struct McpConfig {
    /// The `aud` agent tokens need at the MCP endpoint: `<issuer>/mcp`.
    pub audience: String,
    /// Upstream MCP servers, federated behind the one endpoint.
    pub servers: Vec<McpServerConfig>,
}

/// One upstream MCP server that Palisade runs over stdio.
#[derive(Clone, Debug)]
pub struct McpServerConfig {
    /// Name: the prefix of its tools (`<name>__<tool>`) and its `Palisade::Route`.
    pub name: String,
    /// Program to run (a path, or a name looked up in Palisade's own PATH); empty for a remote
    /// server.
    pub command: String,
    /// A remote Streamable HTTP server's endpoint, instead of a program.
    pub url: Option<Uri>,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its whole environment: nothing else is passed on (values may hold secrets).
    pub env: Vec<(String, Sensitive)>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// Headers sent with every request to a remote server: its own credential (the agent's token
    /// is never forwarded).
    pub headers: Vec<(http::HeaderName, Sensitive)>,
    /// PEM file with the certificate authorities a remote https server is checked against,
    /// instead of the public (Mozilla) roots.
    pub ca_file: Option<PathBuf>,
    /// What its tools hold, for purpose binding (default: the server name).
    pub kind: String,
    /// The system it belongs to, if any.
    pub system: Option<String>,
    /// Data classification of its tools.
    pub classification: palisade_core::principal::Classification,
    /// Per-tool action classes that override the tools' annotations.
    pub tool_actions: Vec<(String, ActionClass)>,
    /// Per-tool arguments that policies see as `context.arguments`, with their types.
    pub tool_arguments: Vec<(String, Vec<(String, ArgType)>)>,
    /// Per-tool string argument naming the content the tool reads or writes (a path, a
    /// document id): content a tainted session writes is labelled under it, and a session
    /// that reads labelled content is tainted.
    pub tool_content: Vec<(String, String)>,
    /// What a tool whose definition changed since it was pinned gets: blocked (default) or
    /// allowed with a high-severity alert.
    pub block_changed_tools: bool,
    /// Tool definitions pinned in the config (SHA-256 hex): authoritative over first sight.
    pub tool_pins: Vec<(String, String)>,
    /// The scope an agent's token needs for write and destructive tools of this server (default
    /// `<name>:write`), issued only by its own, policy-decided token request.
    pub write_scope: String,
    /// Content inspection of its tool calls and results.
    pub inspection: InspectionPolicy,
}

/// Whether `name` can name a tool-call argument in the config.
fn valid_argument_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The type of a declared tool-call argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgType {
    /// A JSON string, Cedar `String`.
    String,
    /// A JSON integer, Cedar `Long`.
    Long,
    /// A JSON boolean, Cedar `Bool`.
    Bool,
    /// A JSON array of strings, Cedar `Set<String>`.
    StringSet,
    /// A JSON array of integers, Cedar `Set<Long>`.
    LongSet,
}

impl ArgType {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "string" => Some(Self::String),
            "long" => Some(Self::Long),
            "bool" => Some(Self::Bool),
            "set<string>" => Some(Self::StringSet),
            "set<long>" => Some(Self::LongSet),
            _ => None,
        }
    }

    /// The Cedar schema type.
    pub fn cedar(self) -> &'static str {
        match self {
            Self::String => "String",
            Self::Long => "Long",
            Self::Bool => "Bool",
            Self::StringSet => "Set<String>",
            Self::LongSet => "Set<Long>",
        }
    }

    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Long => "long",
            Self::Bool => "bool",
            Self::StringSet => "set<string>",
            Self::LongSet => "set<long>",
        }
    }
}

impl McpConfig {
    /// Every declared argument name with its type, across all tools (names share one type).
    pub fn argument_types(&self) -> Vec<(String, ArgType)> {
        let mut all: Vec<(String, ArgType)> = Vec::new();
        for server in &self.servers {
            for (_, args) in &server.tool_arguments {
                for (name, ty) in args {
                    if !all.iter().any(|(n, _)| n == name) {
                        all.push((name.clone(), *ty));
                    }
                }
            }
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

/// The action classes and resource kinds one purpose needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PurposeConfig {
    /// The purpose tag.
    pub tag: String,
    /// Allowed action classes.
    pub actions: Vec<ActionClass>,
    /// Allowed resource kinds.
    pub resource_kinds: Vec<String>,
}

/// The AuthZEN API's mapping onto Cedar.
#[derive(Clone, Debug)]
pub struct AuthZenConfig {
    /// The Cedar namespace of application types and actions (default `App`): subject type `user`
    /// becomes `<namespace>::user`, action `read` becomes `<namespace>::Action::"read"`.
    pub namespace: String,
}

/// Where the server listens and keeps its state.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Listen address (default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// Data directory (default `./palisade-data`).
    pub data_dir: PathBuf,
    /// Token issuer URL (default `http://<listen>`).
    pub issuer: String,
    /// Whether `issuer` was derived from `listen` (and follows the bound port).
    pub issuer_derived: bool,
}

/// Token service settings.
#[derive(Clone, Debug)]
pub struct OAuthConfig {
    /// Access token lifetime, seconds (15 min default, 30 min at most).
    pub access_token_ttl_secs: i64,
    /// Audience when a token request names no `resource`.
    pub default_audience: String,
    /// Whether `default_audience` was derived from the issuer.
    pub default_audience_derived: bool,
    /// Clock skew tolerance, seconds (at most 60).
    pub leeway_secs: i64,
    /// External OpenID Connect providers whose ID tokens may be the subject of a token exchange.
    pub identity_providers: Vec<IdentityProviderConfig>,
}

/// An external OpenID Connect identity provider.
#[derive(Clone, Debug)]
pub struct IdentityProviderConfig {
    /// Name, for messages and audit.
    pub name: String,
    /// The `iss` its ID tokens carry.
    pub issuer: String,
    /// Where its signing keys are (https, or http on a loopback address).
    pub jwks_uri: Uri,
    /// The value its ID tokens must have in `aud` (Palisade's client id at the provider).
    pub audience: String,
    /// The claim that names the human: `email` (default) matches a registered human's email;
    /// any other claim's value is the human's id slug (`human:<value>`).
    pub human_claim: String,
}

/// Policy settings.
#[derive(Clone, Debug)]
pub struct PolicyConfig {
    /// Directory of `.cedar` files, if any beyond the built-in baseline.
    pub dir: Option<PathBuf>,
}

/// Gateway limits.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Largest request body forwarded.
    pub max_body_bytes: u64,
    /// Time allowed for the upstream's response head.
    pub upstream_timeout_secs: u64,
    /// Time allowed to connect to an upstream.
    pub connect_timeout_secs: u64,
    /// Per-agent request rate across all routes, unless the agent record sets its own.
    pub agent_rate_limit: Option<palisade_core::rate::RateLimit>,
    /// Requests one agent may have in flight at once, unless its record sets its own.
    pub max_concurrent_requests_per_agent: u32,
}

/// One upstream behind the gateway.
#[derive(Clone, Debug)]
pub struct RouteConfig {
    /// Route name; the Cedar resource is `Route::"<name>"`.
    pub name: String,
    /// Request paths equal to this or under it (`<prefix>/...`) use this route.
    pub path_prefix: String,
    /// Upstream base URI (`http://host:port[/base]`).
    pub upstream: Uri,
    /// The `aud` a token must carry here.
    pub audience: String,
    /// Whether `audience` is the default audience.
    pub audience_derived: bool,
    /// What the route holds (`repo`, `email`, ...; default: the route name), for purpose binding.
    pub kind: String,
    /// The system (compute boundary) the route belongs to, if any.
    pub system: Option<String>,
    /// The data classification of the route (default `internal`).
    pub classification: palisade_core::principal::Classification,
    /// Whether the prefix is removed before forwarding.
    pub strip_prefix: bool,
    /// Upstream timeout, seconds.
    pub timeout_secs: u64,
    /// Method+path rules, first match wins; unmatched requests use the method's action class.
    pub rules: Vec<RuleConfig>,
    /// Largest request body forwarded on this route.
    pub max_body_bytes: u64,
    /// Largest response body passed back (`None`: no limit).
    pub max_response_bytes: Option<u64>,
    /// Request rate of the route as a whole (all callers together).
    pub rate_limit: Option<palisade_core::rate::RateLimit>,
    /// Request rate of each agent on this route.
    pub agent_rate_limit: Option<palisade_core::rate::RateLimit>,
    /// Objects (requests of `object_read` rules) one session may read through this route.
    pub max_objects_per_session: Option<u64>,
    /// The scope an agent's token needs for write and destructive requests here (default
    /// `<name>:write`); such tokens are issued only by their own, policy-decided request.
    pub write_scope: String,
    /// Content inspection of its requests and responses.
    pub inspection: InspectionPolicy,
    /// Credentials injected into its upstream requests (the agent never holds them).
    pub credentials: Vec<CredentialConfig>,
}

/// The action class of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActionClass {
    /// Reads (GET, HEAD, OPTIONS).
    Read,
    /// Changes (POST, PUT, PATCH).
    Write,
    /// Destruction (DELETE).
    Destructive,
}

impl ActionClass {
    /// Lowercase name, the Cedar action id.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Destructive => "destructive",
        }
    }

    /// The default class of an HTTP method; unknown methods count as writes.
    pub fn of_method(method: &Method) -> Self {
        match *method {
            Method::GET | Method::HEAD | Method::OPTIONS => Self::Read,
            Method::DELETE => Self::Destructive,
            _ => Self::Write,
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "read" => Some(Self::Read),
            "write" => Some(Self::Write),
            "destructive" => Some(Self::Destructive),
            _ => None,
        }
    }
}

/// A method+path override of the action class and resource.
#[derive(Clone, Debug)]
pub struct RuleConfig {
    /// Methods it applies to; empty means all.
    pub methods: Vec<Method>,
    /// Path pattern: `*` matches one segment, a trailing `**` any rest.
    pub path: String,
    /// The action class to use.
    pub action: ActionClass,
    /// A resource name for Cedar (`Resource::"<route>/<name>"`), instead of the route.
    pub resource: Option<String>,
    /// What the matched request touches (default: the resource name, else the route's kind).
    pub kind: Option<String>,
    /// The classification of what the matched request touches (default: the route's).
    pub classification: Option<palisade_core::principal::Classification>,
    /// Whether a matched request counts as reading one object (session volume limits).
    pub object_read: bool,
}

impl RuleConfig {
    /// Whether the rule applies to this request.
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.contains(method)) && path_matches(&self.path, path)
    }
}

/// Glob match of `/`-separated segments: `*` one segment, final `**` the rest (zero or more).
pub fn path_matches(pattern: &str, path: &str) -> bool {
    let mut pat = pattern
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty());
    let mut segs = path.trim_matches('/').split('/').filter(|s| !s.is_empty());
    loop {
        match (pat.next(), segs.next()) {
            (Some("**"), _) => return true,
            (Some("*"), Some(_)) => {}
            (Some(p), Some(s)) if p == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl RouteConfig {
    /// Whether `path` falls under this route's prefix.
    pub fn covers(&self, path: &str) -> bool {
        self.path_prefix == "/"
            || path == self.path_prefix
            || (path.starts_with(&self.path_prefix)
                && path.as_bytes().get(self.path_prefix.len()) == Some(&b'/'))
    }
}

impl Config {
    /// Reads and validates a config file. Relative paths in it (`data_dir`, `policy.dir`) are
    /// resolved against the file's own directory, so the server behaves the same from any working
    /// directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(&name, format!("cannot read the config file: {e}")))?;
        let mut config = Self::from_toml(&text, &name)?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.server.data_dir = base.join(&config.server.data_dir);
        config.policy.dir = config.policy.dir.as_deref().map(|dir| base.join(dir));
        for server in &mut config.mcp.servers {
            server.cwd = server.cwd.as_deref().map(|dir| base.join(dir));
            server.ca_file = server.ca_file.as_deref().map(|f| base.join(f));
        }
        if let Some(f) = config.audit.rules_file.take() {
            config.audit.rules_file = Some(base.join(f));
        }
        config.audit.archive_dir = config.audit.archive_dir.as_deref().map(|d| base.join(d));
        config.vault.master_key_file = config
            .vault
            .master_key_file
            .as_deref()
            .map(|f| base.join(f));
        for sink in &mut config.audit.sinks {
            match &mut sink.target {
                SinkTarget::File { path, .. } => *path = base.join(&*path),
                SinkTarget::Http { ca_file, .. } | SinkTarget::Syslog { ca_file, .. } => {
                    *ca_file = ca_file.as_deref().map(|f| base.join(f));
                }
            }
        }
        Ok(config)
    }

    /// Parses and validates TOML text; `source_name` prefixes every error.
    pub fn from_toml(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::parse(text)
            .map_err(|e| ConfigError::new(source_name, e.to_string()))?;
        let raw: raw::File = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            let inner = inner.trim_end();
            if path == "." {
                ConfigError::new(source_name, inner.to_string())
            } else {
                ConfigError::new(source_name, format!("key `{path}`: {inner}"))
            }
        })?;
        Self::validate(raw).map_err(|m| ConfigError::new(source_name, m))
    }

    /// Validates raw values into the resolved form.
    pub fn validate(raw: raw::File) -> Result<Self, String> {
        let listen_text = raw.server.listen.as_deref().unwrap_or("127.0.0.1:8080");
        let listen: SocketAddr = listen_text
            .parse()
            .map_err(|_| format!("key `server.listen`: `{listen_text}` is not an address; write e.g. \"127.0.0.1:8080\""))?;
        let issuer_derived = raw.server.issuer.is_none();
        let issuer = raw
            .server
            .issuer
            .unwrap_or_else(|| format!("http://{listen}"));
        check_http_url("server.issuer", &issuer)?;
        let issuer = issuer.trim_end_matches('/').to_string();
        let data_dir = PathBuf::from(raw.server.data_dir.as_deref().unwrap_or("./palisade-data"));

        let ttl_min = raw.oauth.access_token_ttl_minutes.unwrap_or(15);
        if !(1..=30).contains(&ttl_min) {
            return Err(format!(
                "key `oauth.access_token_ttl_minutes`: must be 1 to 30 minutes, got {ttl_min}"
            ));
        }
        let leeway = raw.oauth.leeway_seconds.unwrap_or(60);
        if !(0..=60).contains(&leeway) {
            return Err(format!(
                "key `oauth.leeway_seconds`: must be 0 to 60, got {leeway}"
            ));
        }
        let default_audience_derived = raw.oauth.default_audience.is_none();
        let default_audience = raw
            .oauth
            .default_audience
            .map(|a| a.trim_end_matches('/').to_string())
            .unwrap_or_else(|| issuer.clone());
        check_http_url("oauth.default_audience", &default_audience)?;

        let mut identity_providers: Vec<IdentityProviderConfig> = Vec::new();
        for (i, p) in raw.oauth.identity_providers.into_iter().enumerate() {
            let at = format!("oauth.identity_providers[{i}]");
            if !is_name(&p.name) {
                return Err(format!(
                    "key `{at}.name`: `{}` must be lowercase letters, digits, `-`, `_` or `.`",
                    p.name
                ));
            }
            if identity_providers.iter().any(|o| o.name == p.name) {
                return Err(format!("key `{at}.name`: `{}` is used twice", p.name));
            }
            check_secure_url(&format!("{at}.issuer"), &p.issuer)?;
            if identity_providers.iter().any(|o| o.issuer == p.issuer) {
                return Err(format!(
                    "key `{at}.issuer`: `{}` is configured twice",
                    p.issuer
                ));
            }
            let jwks_uri = check_secure_url(&format!("{at}.jwks_uri"), &p.jwks_uri)?;
            if p.audience.trim().is_empty() {
                return Err(format!(
                    "key `{at}.audience`: give Palisade's client id at the provider (the ID tokens' aud)"
                ));
            }
            let human_claim = p.human_claim.unwrap_or_else(|| "email".into());
            if human_claim.is_empty() || !human_claim.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "key `{at}.human_claim`: `{human_claim}` is not a claim name"
                ));
            }
            identity_providers.push(IdentityProviderConfig {
                name: p.name,
                issuer: p.issuer,
                jwks_uri,
                audience: p.audience,
                human_claim,
            });
        }

        let inspection_limits = InspectionConfig {
            max_bytes: raw.inspection.max_bytes.unwrap_or(4 * 1024 * 1024),
            pass_oversize: match raw.inspection.oversize.as_deref() {
                None | Some("block") => false,
                Some("pass") => true,
                Some(other) => {
                    return Err(format!(
                        "key `inspection.oversize`: `{other}` is not block or pass"
                    ));
                }
            },
        };
        if !(1024..=256 * 1024 * 1024).contains(&inspection_limits.max_bytes) {
            return Err(format!(
                "key `inspection.max_bytes`: {} is outside 1024 to 268435456",
                inspection_limits.max_bytes
            ));
        }
        let inspection_base = InspectionPolicy {
            read: inspect_actions(
                "inspection.read",
                InspectionPolicy::DEFAULT.read,
                &raw.inspection.read,
            )?,
            send: inspect_actions(
                "inspection.send",
                InspectionPolicy::DEFAULT.send,
                &raw.inspection.send,
            )?,
            ..InspectionPolicy::DEFAULT
        };
        let gateway = GatewayConfig {
            max_body_bytes: raw.gateway.max_body_bytes.unwrap_or(10 * 1024 * 1024),
            upstream_timeout_secs: raw.gateway.upstream_timeout_seconds.unwrap_or(30),
            connect_timeout_secs: raw.gateway.connect_timeout_seconds.unwrap_or(5),
            agent_rate_limit: rate("gateway.agent_rate_limit", raw.gateway.agent_rate_limit)?,
            max_concurrent_requests_per_agent: raw
                .gateway
                .max_concurrent_requests_per_agent
                .unwrap_or(64),
        };
        if !(1..=4096).contains(&gateway.max_concurrent_requests_per_agent) {
            return Err(format!(
                "key `gateway.max_concurrent_requests_per_agent`: must be 1 to 4096, got {}",
                gateway.max_concurrent_requests_per_agent
            ));
        }
        if gateway.upstream_timeout_secs == 0 || gateway.connect_timeout_secs == 0 {
            return Err("key `gateway`: timeouts must be at least 1 second".into());
        }

        let mut routes: Vec<RouteConfig> = Vec::new();
        for (i, r) in raw.routes.into_iter().enumerate() {
            let at = format!("routes[{i}]");
            let route = validate_route(&at, r, &default_audience, &gateway, &inspection_base)?;
            if let Some(other) = routes.iter().find(|o| o.name == route.name) {
                return Err(format!(
                    "key `{at}.name`: `{}` is used twice; route names are unique",
                    other.name
                ));
            }
            if let Some(other) = routes.iter().find(|o| o.write_scope == route.write_scope) {
                return Err(format!(
                    "key `{at}.write_scope`: `{}` is already route `{}`'s write scope; each route needs its own, so a write token is decided for the route it works on",
                    route.write_scope, other.name
                ));
            }
            if let Some(other) = routes.iter().find(|o| o.path_prefix == route.path_prefix) {
                return Err(format!(
                    "key `{at}.path_prefix`: `{}` is already the prefix of route `{}`",
                    route.path_prefix, other.name
                ));
            }
            routes.push(route);
        }
        // Longest prefix first, so `/a/b` wins over `/a`.
        routes.sort_by_key(|r| std::cmp::Reverse(r.path_prefix.len()));

        let namespace = raw.authzen.namespace.unwrap_or_else(|| "App".into());
        let ident_ok = namespace
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ident_ok || namespace == "Palisade" {
            return Err(format!(
                "key `authzen.namespace`: `{namespace}` must be a Cedar identifier (letters, digits, `_`) other than `Palisade`"
            ));
        }
        let mut purposes = Vec::new();
        for (tag, p) in raw.purposes {
            let key = format!("purposes.{tag}");
            if !is_name(&tag) {
                return Err(format!(
                    "key `{key}`: `{tag}` must be a purpose tag of lowercase letters, digits, `-`, `_` or `.`"
                ));
            }
            let mut actions = Vec::new();
            for a in &p.actions {
                actions.push(ActionClass::parse(a).ok_or_else(|| {
                    format!("key `{key}.actions`: `{a}` is not one of read, write, destructive")
                })?);
            }
            for k in &p.resource_kinds {
                if !is_name(k) {
                    return Err(format!(
                        "key `{key}.resource_kinds`: `{k}` must be lowercase letters, digits, `-`, `_` or `.`"
                    ));
                }
            }
            purposes.push(PurposeConfig {
                tag,
                actions,
                resource_kinds: p.resource_kinds,
            });
        }
        let mut mcp_servers: Vec<McpServerConfig> = Vec::new();
        for (i, s) in raw.mcp.servers.into_iter().enumerate() {
            let at = format!("mcp.servers[{i}]");
            let slug_ok = !s.name.is_empty()
                && s.name.len() <= 63
                && !s.name.contains("__")
                && !s.name.starts_with('_')
                && !s.name.ends_with('_')
                && s.name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                });
            if !slug_ok {
                return Err(format!(
                    "key `{at}.name`: `{}` must be 1 to 63 lowercase letters, digits, `-` or `_`, without `__` and not starting or ending with `_` (tools are named <server>__<tool>)",
                    s.name
                ));
            }
            if routes.iter().any(|r| r.name == s.name)
                || mcp_servers.iter().any(|m| m.name == s.name)
            {
                return Err(format!(
                    "key `{at}.name`: `{}` is already a route or MCP server name; names are shared",
                    s.name
                ));
            }
            let (command, url) = match (s.command, s.url) {
                (Some(c), None) if !c.trim().is_empty() => (c, None),
                (None, Some(u)) => {
                    let uri: Uri = u
                        .parse()
                        .map_err(|_| format!("key `{at}.url`: `{u}` is not a URL"))?;
                    match (uri.scheme_str(), uri.authority()) {
                        (Some("http" | "https"), Some(_)) => {}
                        _ => {
                            return Err(format!(
                                "key `{at}.url`: `{u}` must look like https://host/mcp (or http:// on a trusted network)"
                            ));
                        }
                    }
                    if !s.headers.is_empty() && !is_secure(&uri) {
                        return Err(format!(
                            "key `{at}.headers`: the server's credential would travel in clear text to `{u}`; use https:// (http:// is allowed only on a loopback address)"
                        ));
                    }
                    (String::new(), Some(uri))
                }
                _ => {
                    return Err(format!(
                        "key `{at}`: give exactly one of `command` (a local stdio server) and `url` (a remote Streamable HTTP server)"
                    ));
                }
            };
            if url.is_none() && (!s.headers.is_empty() || s.ca_file.is_some()) {
                return Err(format!(
                    "key `{at}`: `headers` and `ca_file` are for a remote server (`url`); a local server gets its credentials through `env`"
                ));
            }
            if url.is_some() && (!s.env.is_empty() || !s.args.is_empty() || s.cwd.is_some()) {
                return Err(format!(
                    "key `{at}`: `env`, `args` and `cwd` are for a local server (`command`); a remote server gets its credential through `headers`"
                ));
            }
            let headers = credential_headers(&at, s.headers)?;
            let mut env = Vec::new();
            for (name, value) in s.env {
                let value = expand_env(&format!("{at}.env.{name}"), &value)?;
                env.push((name, Sensitive(value)));
            }
            let kind = s.kind.unwrap_or_else(|| s.name.clone());
            if !is_name(&kind) {
                return Err(format!("key `{at}.kind`: `{kind}` is not a name"));
            }
            let classification = match s.classification.as_deref() {
                None => palisade_core::principal::Classification::Internal,
                Some(c) => palisade_core::principal::Classification::parse(c).ok_or_else(|| {
                    format!("key `{at}.classification`: `{c}` is not public, internal, confidential or restricted")
                })?,
            };
            let mut tool_actions = Vec::new();
            let mut tool_arguments = Vec::new();
            let mut tool_pins = Vec::new();
            let mut tool_content = Vec::new();
            for (tool, t) in s.tools {
                if let Some(arg) = &t.content {
                    if !valid_argument_name(arg) {
                        return Err(format!(
                            "key `{at}.tools.{tool}.content`: `{arg}` is not an argument name (letters, digits, `_` and `-`)"
                        ));
                    }
                    tool_content.push((tool.clone(), arg.clone()));
                }
                if let Some(pin) = &t.pin {
                    let hex = pin
                        .strip_prefix("sha256:")
                        .unwrap_or(pin)
                        .to_ascii_lowercase();
                    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(format!(
                            "key `{at}.tools.{tool}.pin`: `{pin}` is not a SHA-256 in hex; `palisade mcp pins` shows the current ones"
                        ));
                    }
                    tool_pins.push((tool.clone(), hex));
                }
                if let Some(a) = &t.action {
                    let action = ActionClass::parse(a).ok_or_else(|| {
                        format!(
                            "key `{at}.tools.{tool}.action`: `{a}` is not one of read, write, destructive"
                        )
                    })?;
                    tool_actions.push((tool.clone(), action));
                }
                let mut args = Vec::new();
                for (name, ty) in &t.arguments {
                    let key = format!("{at}.tools.{tool}.arguments.{name}");
                    if !valid_argument_name(name) {
                        return Err(format!(
                            "key `{key}`: argument names are letters, digits, `_` and `-`"
                        ));
                    }
                    let ty = ArgType::parse(ty).ok_or_else(|| {
                        format!(
                            "key `{key}`: `{ty}` is not one of string, long, bool, set<string>, set<long>"
                        )
                    })?;
                    let clash = mcp_servers
                        .iter()
                        .flat_map(|m| m.tool_arguments.iter())
                        .chain(tool_arguments.iter())
                        .flat_map(|(_, a): &(String, Vec<(String, ArgType)>)| a.iter())
                        .find(|(n, t)| n == name && *t != ty);
                    if let Some((_, other)) = clash {
                        return Err(format!(
                            "key `{key}`: `{name}` is declared as {} elsewhere; policies see one `context.arguments.{name}`, so it needs one type",
                            other.as_str()
                        ));
                    }
                    args.push((name.clone(), ty));
                }
                if !args.is_empty() {
                    tool_arguments.push((tool, args));
                }
            }
            let block_changed_tools = match s.on_tool_change.as_deref() {
                None | Some("block") => true,
                Some("flag") => false,
                Some(other) => {
                    return Err(format!(
                        "key `{at}.on_tool_change`: `{other}` is not block or flag"
                    ));
                }
            };
            let write_scope = write_scope(&at, &s.name, s.write_scope.clone())?;
            if routes.iter().any(|r| r.write_scope == write_scope)
                || mcp_servers.iter().any(|m| m.write_scope == write_scope)
            {
                return Err(format!(
                    "key `{at}.write_scope`: `{write_scope}` is already another route's or server's write scope"
                ));
            }
            let inspection = inspection_policy(&at, &inspection_base, s.untrusted, &s.inspection)?;
            mcp_servers.push(McpServerConfig {
                inspection,
                write_scope,
                block_changed_tools,
                name: s.name,
                command,
                url,
                args: s.args,
                env,
                headers,
                ca_file: s.ca_file.map(PathBuf::from),
                cwd: s.cwd.map(PathBuf::from),
                kind,
                system: s.system,
                classification,
                tool_actions,
                tool_arguments,
                tool_content,
                tool_pins,
            });
        }
        for name in raw.audit.lists.keys() {
            if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') || name.is_empty() {
                return Err(format!(
                    "key `audit.lists.{name}`: list names are letters, digits and `_`"
                ));
            }
        }
        let mut databases: Vec<DatabaseConfig> = Vec::new();
        for (i, d) in raw.vault.databases.into_iter().enumerate() {
            let at = format!("vault.databases[{i}]");
            if !is_name(&d.name) || databases.iter().any(|o| o.name == d.name) {
                return Err(format!(
                    "key `{at}.name`: `{}` must be a unique name of lowercase letters, digits, `-`, `_` or `.`",
                    d.name
                ));
            }
            if !(d.url.starts_with("postgres://") || d.url.starts_with("postgresql://")) {
                return Err(format!(
                    "key `{at}.url`: give a postgres:// connection string for an admin role"
                ));
            }
            if d.roles.is_empty() {
                return Err(format!(
                    "key `{at}.roles`: define at least one role, e.g. [vault.databases.roles.readonly] creation = [\"CREATE ROLE {{{{name}}}} LOGIN PASSWORD {{{{password}}}} VALID UNTIL {{{{expiry}}}}\", ...]"
                ));
            }
            let mut roles = Vec::new();
            for (role, r) in d.roles {
                if !is_name(&role) {
                    return Err(format!(
                        "key `{at}.roles.{role}`: role names are lowercase letters, digits, `-`, `_` or `.`"
                    ));
                }
                let creates = r
                    .creation
                    .iter()
                    .any(|s| s.contains("{{name}}") && s.contains("VALID UNTIL {{expiry}}"));
                if !creates {
                    return Err(format!(
                        "key `{at}.roles.{role}.creation`: a statement must create {{{{name}}}} with VALID UNTIL {{{{expiry}}}}, so the database enforces the lease's end too"
                    ));
                }
                roles.push(DatabaseRoleConfig {
                    name: role,
                    creation: r.creation,
                    revocation: r.revocation,
                    writes: r.writes,
                });
            }
            databases.push(DatabaseConfig {
                url: Sensitive(expand_env(&format!("{at}.url"), &d.url)?),
                name: d.name,
                roles,
            });
        }
        let vault = VaultConfig {
            master_key_file: raw.vault.master_key_file.map(PathBuf::from),
            master_key_env: raw.vault.master_key_env,
            audience: String::new(),
            databases,
        };
        if vault.master_key_file.is_some() && vault.master_key_env.is_some() {
            return Err(
                "key `vault`: give `master_key_file` or `master_key_env`, not both".to_string(),
            );
        }
        let approvals = approvals(raw.approvals, &issuer)?;
        Ok(Self {
            approvals,
            vault,
            audit: AuditConfig {
                retention: raw.audit.retention.as_deref().map(retention).transpose()?,
                archive_dir: raw.audit.archive_dir.map(PathBuf::from),
                sinks: sinks(raw.audit.sinks)?,
                rules_file: raw.audit.rules_file.map(PathBuf::from),
                lists: raw.audit.lists.into_iter().collect(),
            },
            inspection: inspection_limits,
            mcp: McpConfig {
                audience: format!("{issuer}{MCP_PATH}"),
                servers: mcp_servers,
            },
            purposes,
            authzen: AuthZenConfig { namespace },
            server: ServerConfig {
                listen,
                data_dir,
                issuer,
                issuer_derived,
            },
            oauth: OAuthConfig {
                access_token_ttl_secs: ttl_min * 60,
                default_audience,
                default_audience_derived,
                leeway_secs: leeway,
                identity_providers,
            },
            policy: PolicyConfig {
                dir: raw.policy.dir.map(PathBuf::from),
            },
            gateway,
            routes,
        })
    }

    /// Points derived URLs at the address actually bound (listening on port 0 picks a port).
    pub fn bind_to(&mut self, addr: SocketAddr) {
        self.server.listen = addr;
        if self.server.issuer_derived {
            self.server.issuer = format!("http://{addr}");
            if self.oauth.default_audience_derived {
                self.oauth.default_audience = self.server.issuer.clone();
            }
        }
        for route in &mut self.routes {
            if route.audience_derived {
                route.audience = self.oauth.default_audience.clone();
            }
        }
        self.mcp.audience = format!("{}{MCP_PATH}", self.server.issuer);
        self.vault.audience = format!("{}/vault", self.server.issuer);
        if self.approvals.link_derived {
            self.approvals.link = format!("{}/api/v1/approvals/{{id}}", self.server.issuer);
        }
    }

    /// The route serving `path`, longest prefix first.
    pub fn route_for(&self, path: &str) -> Option<&RouteConfig> {
        self.routes.iter().find(|r| r.covers(path))
    }
}

/// Lowercase letters, digits, `-`, `_`, `.`; 1 to 63 characters (tags, kinds).
fn is_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

/// A configured value that may hold a secret: its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Sensitive(pub String);

impl Sensitive {
    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Sensitive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Configured request headers (a remote server's or a collector's credential): names checked,
/// values read through [`expand_env`] and kept [`Sensitive`].
fn credential_headers(
    at: &str,
    raw: std::collections::BTreeMap<String, String>,
) -> Result<Vec<(http::HeaderName, Sensitive)>, String> {
    let mut headers = Vec::new();
    for (name, value) in raw {
        let key = format!("{at}.headers.{name}");
        let header = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("key `{key}`: `{name}` is not a header name"))?;
        if matches!(
            header.as_str(),
            "host"
                | "content-type"
                | "content-length"
                | "accept"
                | "connection"
                | "transfer-encoding"
                | "mcp-session-id"
                | "mcp-protocol-version"
        ) {
            return Err(format!(
                "key `{key}`: Palisade sets `{name}` itself; configure only the credential and custom headers"
            ));
        }
        let value = expand_env(&key, &value)?;
        if http::HeaderValue::from_str(&value).is_err() {
            return Err(format!(
                "key `{key}`: the value is not a valid header value (control characters or non-ASCII)"
            ));
        }
        headers.push((header, Sensitive(value)));
    }
    Ok(headers)
}

/// `[approvals]`, checked.
fn approvals(raw: raw::Approvals, issuer: &str) -> Result<ApprovalsConfig, String> {
    use palisade_core::approval::{Approver, ResolvedRule, parse_duration};
    let duration = |key: &str, v: Option<String>, default: u64, max: u64| -> Result<u64, String> {
        let secs = v.map_or(Ok(default), |t| {
            parse_duration(&t).map_err(|e| format!("key `approvals.{key}`: {e}"))
        })?;
        if secs > max {
            return Err(format!("key `approvals.{key}`: at most {}d", max / 86_400));
        }
        Ok(secs)
    };
    let mut approvers = Vec::new();
    for a in raw.approvers.unwrap_or_else(|| vec!["owner".into()]) {
        let a = Approver::parse(&a).map_err(|e| format!("key `approvals.approvers`: {e}"))?;
        if !approvers.contains(&a) {
            approvers.push(a);
        }
    }
    if approvers.is_empty() {
        return Err(
            "key `approvals.approvers`: name at least one approver, e.g. [\"owner\"]".into(),
        );
    }
    let count = raw.count.unwrap_or(1);
    if !(1..=10).contains(&count) {
        return Err(format!(
            "key `approvals.count`: {count} must be from 1 to 10"
        ));
    }
    let uses = raw.uses.unwrap_or(1);
    if !(1..=100).contains(&uses) {
        return Err(format!(
            "key `approvals.uses`: {uses} must be from 1 to 100 (how often an approved call may run)"
        ));
    }
    let hold_secs = match raw.hold.as_deref().map(str::trim) {
        None | Some("0") | Some("0s") => 0,
        Some(t) => parse_duration(t).map_err(|e| format!("key `approvals.hold`: {e}"))?,
    };
    if hold_secs > 300 {
        return Err(format!(
            "key `approvals.hold`: {hold_secs}s is longer than 5m; clients and proxies time out, so answer at once (hold = \"0s\") and let the agent retry"
        ));
    }
    let mut webhooks: Vec<ApprovalWebhook> = Vec::new();
    for (i, w) in raw.webhooks.into_iter().enumerate() {
        let at = format!("approvals.webhooks[{i}]");
        if w.name.trim().is_empty() || webhooks.iter().any(|o| o.name == w.name) {
            return Err(format!(
                "key `{at}.name`: give each webhook a unique, non-empty name"
            ));
        }
        if let Some(f) = w.format.as_deref().filter(|f| *f != "slack") {
            return Err(format!(
                "key `{at}.format`: `{f}` is unknown; the format is \"slack\" (Slack-compatible JSON)"
            ));
        }
        let url = expand_env(&format!("{at}.url"), &w.url)?;
        if !(url.starts_with("http://") || url.starts_with("https://"))
            || url.parse::<http::Uri>().is_err()
        {
            return Err(format!("key `{at}.url`: not an http:// or https:// URL"));
        }
        webhooks.push(ApprovalWebhook {
            name: w.name,
            url: Sensitive(url),
        });
    }
    let link_derived = raw.link.is_none();
    let link = raw
        .link
        .unwrap_or_else(|| format!("{issuer}/api/v1/approvals/{{id}}"));
    if !link.contains("{id}") {
        return Err(
            "key `approvals.link`: the link must contain `{id}`, where the approval id goes".into(),
        );
    }
    Ok(ApprovalsConfig {
        destructive: raw.destructive.unwrap_or(true),
        defaults: ResolvedRule {
            approvers,
            count,
            grant_secs: duration(
                "grant",
                raw.grant,
                15 * 60,
                palisade_core::approval::MAX_GRANT_SECS,
            )?,
            four_eyes: raw.four_eyes.unwrap_or(true),
            uses,
            sources: vec!["config:approvals".into()],
        },
        wait_secs: duration("wait", raw.wait, 3600, 7 * 86_400)?,
        hold_secs,
        link,
        link_derived,
        webhooks,
    })
}

/// `[audit] retention`: a number and a unit (`90d`, `12h`, `30m`), at least a minute.
fn retention(text: &str) -> Result<std::time::Duration, String> {
    let bad = || {
        format!(
            "key `audit.retention`: `{text}` is not a duration such as `90d`, `12h` or `30m` (at least 1m)"
        )
    };
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let n: u64 = t[..split].parse().map_err(|_| bad())?;
    let unit = match &t[split..] {
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    let secs = n.checked_mul(unit).filter(|s| *s >= 60).ok_or_else(bad)?;
    Ok(std::time::Duration::from_secs(secs))
}

/// `[[audit.sinks]]`, checked: names unique, each kind with its own keys and formats.
fn sinks(raw: Vec<raw::Sink>) -> Result<Vec<SinkConfig>, String> {
    let mut out: Vec<SinkConfig> = Vec::new();
    for (i, s) in raw.into_iter().enumerate() {
        let at = format!("audit.sinks[{i}]");
        let ok_name = !s.name.is_empty()
            && s.name.len() <= 64
            && s.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok_name {
            return Err(format!(
                "key `{at}.name`: `{}` is not a sink name (letters, digits, `_` and `-`)",
                s.name
            ));
        }
        if out.iter().any(|o| o.name == s.name) {
            return Err(format!(
                "key `{at}.name`: `{}` is used twice; each sink keeps its own delivery cursor",
                s.name
            ));
        }
        let unused = |key: &str, set: bool| -> Result<(), String> {
            if set {
                Err(format!("key `{at}.{key}`: not used by a `{}` sink", s.kind))
            } else {
                Ok(())
            }
        };
        let format = |allowed: &[SinkFormat], default: SinkFormat| match &s.format {
            None => Ok(default),
            Some(f) => allowed
                .iter()
                .copied()
                .find(|a| a.as_str() == f)
                .ok_or_else(|| {
                    let names: Vec<&str> = allowed.iter().map(|a| a.as_str()).collect();
                    format!(
                        "key `{at}.format`: a `{}` sink writes {}, not `{f}`",
                        s.kind,
                        names.join(" or ")
                    )
                }),
        };
        let (target, format) = match s.kind.as_str() {
            "file" => {
                unused("url", s.url.is_some())?;
                unused("address", s.address.is_some())?;
                unused("transport", s.transport.is_some())?;
                unused("headers", !s.headers.is_empty())?;
                unused("ca_file", s.ca_file.is_some())?;
                let path = s
                    .path
                    .clone()
                    .ok_or_else(|| format!("key `{at}.path`: a file sink needs a path"))?;
                let rotate_bytes = s.rotate_bytes.unwrap_or(100 << 20);
                if rotate_bytes < 4096 {
                    return Err(format!(
                        "key `{at}.rotate_bytes`: {rotate_bytes} is below the smallest size, 4096"
                    ));
                }
                let keep = s.keep.unwrap_or(5);
                if keep > 1000 {
                    return Err(format!("key `{at}.keep`: keep at most 1000 rotated files"));
                }
                (
                    SinkTarget::File {
                        path: PathBuf::from(path),
                        rotate_bytes,
                        keep,
                    },
                    format(&[SinkFormat::Json, SinkFormat::Ocsf], SinkFormat::Json)?,
                )
            }
            "http" | "otlp" => {
                unused("path", s.path.is_some())?;
                unused("address", s.address.is_some())?;
                unused("transport", s.transport.is_some())?;
                unused("rotate_bytes", s.rotate_bytes.is_some())?;
                unused("keep", s.keep.is_some())?;
                let url = s
                    .url
                    .as_deref()
                    .ok_or_else(|| format!("key `{at}.url`: an {} sink needs a url", s.kind))?;
                let url = check_secure_url(&format!("{at}.url"), url)?;
                let format = if s.kind == "otlp" {
                    format(&[SinkFormat::Otlp], SinkFormat::Otlp)?
                } else {
                    format(
                        &[SinkFormat::Json, SinkFormat::Ocsf, SinkFormat::Hec],
                        SinkFormat::Json,
                    )?
                };
                (
                    SinkTarget::Http {
                        url,
                        headers: {
                            let headers = credential_headers(&at, s.headers)?;
                            // Sinks start before the vault opens: their credentials come from
                            // the environment.
                            if let Some((name, _)) = headers
                                .iter()
                                .find(|(_, v)| v.expose().contains("${vault:"))
                            {
                                return Err(format!(
                                    "key `{at}.headers.{name}`: a sink's headers take `${{NAME}}` from the environment, not `${{vault:...}}`"
                                ));
                            }
                            headers
                        },
                        ca_file: s.ca_file.map(PathBuf::from),
                    },
                    format,
                )
            }
            "syslog" => {
                unused("path", s.path.is_some())?;
                unused("url", s.url.is_some())?;
                unused("headers", !s.headers.is_empty())?;
                unused("rotate_bytes", s.rotate_bytes.is_some())?;
                unused("keep", s.keep.is_some())?;
                let address = s.address.clone().ok_or_else(|| {
                    format!("key `{at}.address`: a syslog sink needs an address (host:port)")
                })?;
                let port_ok = address
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
                if !port_ok {
                    return Err(format!("key `{at}.address`: `{address}` is not host:port"));
                }
                let transport = match s.transport.as_deref() {
                    None | Some("tls") => SyslogTransport::Tls,
                    Some("tcp") => SyslogTransport::Tcp,
                    Some("udp") => SyslogTransport::Udp,
                    Some(other) => {
                        return Err(format!(
                            "key `{at}.transport`: `{other}` is not one of tls, tcp, udp"
                        ));
                    }
                };
                if transport != SyslogTransport::Tls && s.ca_file.is_some() {
                    return Err(format!("key `{at}.ca_file`: only a tls transport uses it"));
                }
                (
                    SinkTarget::Syslog {
                        address,
                        transport,
                        ca_file: s.ca_file.map(PathBuf::from),
                    },
                    format(&[SinkFormat::Syslog, SinkFormat::Cef], SinkFormat::Syslog)?,
                )
            }
            other => {
                return Err(format!(
                    "key `{at}.kind`: `{other}` is not one of file, http, syslog, otlp"
                ));
            }
        };
        for k in &s.kinds {
            let stem = k.strip_suffix('*').unwrap_or(k);
            if stem.contains('*')
                || !stem
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'.' || b == b'_')
            {
                return Err(format!(
                    "key `{at}.kinds`: `{k}` is not an event kind (`alert.raised`) or a prefix (`token.*`)"
                ));
            }
        }
        let batch = s.batch.unwrap_or(500);
        if !(1..=10_000).contains(&batch) {
            return Err(format!(
                "key `{at}.batch`: {batch} is not within 1 to 10000"
            ));
        }
        out.push(SinkConfig {
            name: s.name,
            target,
            format,
            kinds: s.kinds,
            required: s.required,
            batch,
        });
    }
    Ok(out)
}

/// `${NAME}` in a value is replaced by Palisade's environment variable `NAME` (so a secret need
/// not sit in the config file); `$$` is a literal `$`. An unset variable is an error.
fn expand_env(key: &str, value: &str) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = r.find('}').ok_or_else(|| {
                format!(
                    "key `{key}`: `${{` is not closed; write `${{NAME}}`, or `$$` for a literal `$`"
                )
            })?;
            let name = &r[..end];
            // `${vault:NAME}` stays for the vault to fill in when the value is used.
            if let Some(secret) = name.strip_prefix("vault:") {
                let ok = !secret.is_empty()
                    && secret.len() <= 128
                    && secret.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/')
                    });
                if !ok {
                    return Err(format!(
                        "key `{key}`: `${{vault:{secret}}}` does not name a vault secret (letters, digits, `_`, `-`, `.`, `/`)"
                    ));
                }
                out.push_str("${vault:");
                out.push_str(secret);
                out.push('}');
                rest = &r[end + 1..];
                continue;
            }
            let ok =
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return Err(format!(
                    "key `{key}`: `${{{name}}}` is not an environment variable name"
                ));
            }
            let v = std::env::var(name).map_err(|_| {
                format!("key `{key}`: environment variable `{name}` is not set (or not UTF-8)")
            })?;
            out.push_str(&v);
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// https, or http to a loopback address.
fn is_secure(uri: &Uri) -> bool {
    let loopback = uri
        .host()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
        .is_some_and(|h| {
            h == "localhost"
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
    uri.scheme_str() == Some("https") || (uri.scheme_str() == Some("http") && loopback)
}

/// An https URL, or http on a loopback address (development and tests): keys and identities
/// must not travel in clear text across a network.
fn check_secure_url(key: &str, text: &str) -> Result<Uri, String> {
    let uri: Uri = text
        .parse()
        .map_err(|_| format!("key `{key}`: `{text}` is not a URL"))?;
    let loopback = uri
        .host()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
        .is_some_and(|h| {
            h == "localhost"
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
    match (uri.scheme_str(), uri.authority()) {
        (Some("https"), Some(_)) => Ok(uri),
        (Some("http"), Some(_)) if loopback => Ok(uri),
        (Some("http"), Some(_)) => Err(format!(
            "key `{key}`: `{text}` must use https:// (http:// is allowed only on a loopback address)"
        )),
        _ => Err(format!(
            "key `{key}`: `{text}` must be an absolute https:// URL"
        )),
    }
}

fn check_http_url(key: &str, text: &str) -> Result<(), String> {
    let uri: Uri = text
        .parse()
        .map_err(|_| format!("key `{key}`: `{text}` is not a URL"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) => Ok(()),
        _ => Err(format!(
            "key `{key}`: `{text}` must be an absolute http:// or https:// URL"
        )),
    }
}

fn validate_route(
    at: &str,
    r: raw::Route,
    default_audience: &str,
    gateway: &GatewayConfig,
    inspection: &InspectionPolicy,
) -> Result<RouteConfig, String> {
    let inspection = inspection_policy(at, inspection, r.untrusted, &r.inspection)?;
    let slug_ok = !r.name.is_empty()
        && r.name.len() <= 63
        && r.name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !slug_ok {
        return Err(format!(
            "key `{at}.name`: `{}` must be 1 to 63 lowercase letters, digits, `-` or `_`",
            r.name
        ));
    }
    let prefix = r.path_prefix.trim_end_matches('/');
    let prefix = if prefix.is_empty() { "/" } else { prefix };
    if !prefix.starts_with('/') || prefix.contains("//") || prefix.contains(['?', '#', '*']) {
        return Err(format!(
            "key `{at}.path_prefix`: `{}` must be a plain path starting with `/`",
            r.path_prefix
        ));
    }
    if let Some(reserved) = RESERVED_PREFIXES
        .iter()
        .find(|p| prefix == "/" || prefix == **p || prefix.starts_with(&format!("{p}/")))
    {
        return Err(format!(
            "key `{at}.path_prefix`: `{prefix}` would shadow `{reserved}`, which Palisade serves itself"
        ));
    }
    let upstream: Uri = r
        .upstream
        .parse()
        .map_err(|_| format!("key `{at}.upstream`: `{}` is not a URL", r.upstream))?;
    match (upstream.scheme_str(), upstream.authority()) {
        (Some("http"), Some(_)) => {}
        (Some("https"), Some(_)) => {
            return Err(format!(
                "key `{at}.upstream`: https upstreams are not supported yet; use http:// on a trusted network"
            ));
        }
        _ => {
            return Err(format!(
                "key `{at}.upstream`: `{}` must look like http://host:port",
                r.upstream
            ));
        }
    }
    if upstream.query().is_some() {
        return Err(format!(
            "key `{at}.upstream`: a query string is not allowed in an upstream"
        ));
    }
    let audience_derived = r.audience.is_none();
    // Audiences compare as strings, so one canonical form: no trailing slash.
    let audience = r
        .audience
        .map(|a| a.trim_end_matches('/').to_string())
        .unwrap_or_else(|| default_audience.to_string());
    check_http_url(&format!("{at}.audience"), &audience)?;
    let mut rules = Vec::new();
    for (j, rule) in r.rules.into_iter().enumerate() {
        let rat = format!("{at}.rules[{j}]");
        let action = ActionClass::parse(&rule.action).ok_or_else(|| {
            format!(
                "key `{rat}.action`: `{}` is not one of read, write, destructive",
                rule.action
            )
        })?;
        let mut methods = Vec::new();
        for m in &rule.methods {
            let upper = m.to_ascii_uppercase();
            methods.push(
                Method::from_bytes(upper.as_bytes())
                    .map_err(|_| format!("key `{rat}.methods`: `{m}` is not an HTTP method"))?,
            );
        }
        if !rule.path.starts_with('/') {
            return Err(format!(
                "key `{rat}.path`: `{}` must start with `/`",
                rule.path
            ));
        }
        if let Some(res) = &rule.resource
            && (res.is_empty() || res.contains('"'))
        {
            return Err(format!(
                "key `{rat}.resource`: `{res}` must be a non-empty name without quotes"
            ));
        }
        if let Some(kind) = &rule.kind
            && !is_name(kind)
        {
            return Err(format!(
                "key `{rat}.kind`: `{kind}` must be lowercase letters, digits, `-`, `_` or `.`"
            ));
        }
        let classification = rule
            .classification
            .as_deref()
            .map(|c| {
                palisade_core::principal::Classification::parse(c).ok_or_else(|| {
                    format!("key `{rat}.classification`: `{c}` is not public, internal, confidential or restricted")
                })
            })
            .transpose()?;
        rules.push(RuleConfig {
            methods,
            path: rule.path,
            action,
            resource: rule.resource,
            kind: rule.kind,
            classification,
            object_read: rule.object_read,
        });
    }
    let write_scope = write_scope(at, &r.name, r.write_scope.clone())?;
    let max_body_bytes = r.max_body_bytes.unwrap_or(gateway.max_body_bytes);
    for (key, value) in [
        ("max_body_bytes", Some(max_body_bytes)),
        ("max_response_bytes", r.max_response_bytes),
        ("max_objects_per_session", r.max_objects_per_session),
    ] {
        if value == Some(0) {
            return Err(format!(
                "key `{at}.{key}`: must be at least 1; leave it out for the default"
            ));
        }
    }
    let kind = r.kind.unwrap_or_else(|| r.name.clone());
    if !is_name(&kind) {
        return Err(format!(
            "key `{at}.kind`: `{kind}` must be lowercase letters, digits, `-`, `_` or `.`"
        ));
    }
    let classification = match r.classification.as_deref() {
        None => palisade_core::principal::Classification::Internal,
        Some(c) => palisade_core::principal::Classification::parse(c).ok_or_else(|| {
            format!("key `{at}.classification`: `{c}` is not public, internal, confidential or restricted")
        })?,
    };
    if let Some(system) = &r.system
        && !is_name(system)
    {
        return Err(format!(
            "key `{at}.system`: `{system}` must be lowercase letters, digits, `-`, `_` or `.`"
        ));
    }
    let mut credentials = Vec::new();
    for (i, c) in r.credentials.into_iter().enumerate() {
        let key = format!("{at}.credentials[{i}]");
        let secret_ok = !c.secret.is_empty()
            && c.secret.len() <= 128
            && c.secret
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'));
        if !secret_ok {
            return Err(format!(
                "key `{key}.secret`: `{}` is not a secret name (letters, digits, `_`, `-`, `.`, `/`)",
                c.secret
            ));
        }
        let need_name = |what: &str| {
            c.name.clone().filter(|n| !n.is_empty()).ok_or_else(|| {
                format!(
                    "key `{key}.name`: a `{}` credential needs the {what}",
                    c.kind
                )
            })
        };
        let kind = match c.kind.as_str() {
            "bearer" => CredentialKind::Bearer,
            "header" => {
                let n = need_name("header name")?;
                let h = http::HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| format!("key `{key}.name`: `{n}` is not a header name"))?;
                if matches!(
                    h.as_str(),
                    "host" | "content-length" | "transfer-encoding" | "connection"
                ) {
                    return Err(format!(
                        "key `{key}.name`: `{n}` is set by Palisade; choose the upstream's credential header"
                    ));
                }
                CredentialKind::Header(h)
            }
            "basic" => CredentialKind::Basic(need_name("user name")?),
            "query" => CredentialKind::Query(need_name("parameter name")?),
            other => {
                return Err(format!(
                    "key `{key}.kind`: `{other}` is not one of bearer, header, basic, query"
                ));
            }
        };
        let mut actions = Vec::new();
        for a in &c.actions {
            actions.push(ActionClass::parse(a).ok_or_else(|| {
                format!("key `{key}.actions`: `{a}` is not one of read, write, destructive")
            })?);
        }
        if actions.is_empty() {
            actions = vec![
                ActionClass::Read,
                ActionClass::Write,
                ActionClass::Destructive,
            ];
        }
        for other in &credentials {
            let CredentialConfig { actions: taken, .. } = other;
            if actions.iter().any(|a| taken.contains(a)) {
                return Err(format!(
                    "key `{key}.actions`: another credential of the route already covers one of {:?}; give each action class one credential",
                    c.actions
                ));
            }
        }
        credentials.push(CredentialConfig {
            secret: c.secret,
            kind,
            actions,
        });
    }
    if !credentials.is_empty() && !inspection.enabled {
        return Err(format!(
            "key `{at}.inspection`: a route with credentials keeps content inspection on, so an upstream that echoes the credential back has it masked"
        ));
    }
    Ok(RouteConfig {
        credentials,
        kind,
        system: r.system,
        classification,
        name: r.name,
        path_prefix: prefix.to_string(),
        upstream,
        audience,
        audience_derived,
        strip_prefix: r.strip_prefix,
        timeout_secs: r.timeout_seconds.unwrap_or(gateway.upstream_timeout_secs),
        rules,
        max_body_bytes,
        max_response_bytes: r.max_response_bytes,
        rate_limit: rate(&format!("{at}.rate_limit"), r.rate_limit)?,
        agent_rate_limit: rate(&format!("{at}.agent_rate_limit"), r.agent_rate_limit)?,
        max_objects_per_session: r.max_objects_per_session,
        write_scope,
        inspection,
    })
}

/// A route's or MCP server's write scope: as given, else `<name>:write`; one scope token that
/// does not end in `:read`.
fn write_scope(at: &str, name: &str, given: Option<String>) -> Result<String, String> {
    let scope = given.unwrap_or_else(|| format!("{name}:write"));
    let one_token = scope
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
    if scope.is_empty() || scope.ends_with(":read") || !one_token {
        return Err(format!(
            "key `{at}.write_scope`: `{scope}` must be one scope token (no spaces or quotes) that does not end in `:read`"
        ));
    }
    Ok(scope)
}

fn rate(key: &str, text: Option<String>) -> Result<Option<palisade_core::rate::RateLimit>, String> {
    text.map(|t| palisade_core::rate::RateLimit::parse(&t).map_err(|e| format!("key `{key}`: {e}")))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::from_toml(text, "test.toml")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_the_key_and_the_fix() {
        let cases = [
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n",
                "unknown field `bogus`",
            ),
            (
                "[[routes]]\nname = \"t\"\npath_prefix = \"/t\"\nupstream = \"http://127.0.0.1:1\"\ncolour = 1\n",
                "routes[0]",
            ),
            (
                "[oauth]\naccess_token_ttl_minutes = 45\n",
                "1 to 30 minutes",
            ),
            (
                "[[mcp.servers]]\nname = \"git\"\ncommand = \"g\"\n[mcp.servers.tools.log]\narguments = { repo = \"path\" }\n",
                "mcp.servers[0].tools.log.arguments.repo`: `path` is not one of string",
            ),
            (
                "[[mcp.servers]]\nname = \"git\"\ncommand = \"g\"\n[mcp.servers.tools.log]\ncontent = \"a path\"\n",
                "mcp.servers[0].tools.log.content`: `a path` is not an argument name",
            ),
            (
                "[[mcp.servers]]\nname = \"git\"\ncommand = \"g\"\n[mcp.servers.tools.a]\narguments = { repo = \"string\" }\n[mcp.servers.tools.b]\narguments = { repo = \"long\" }\n",
                "is declared as string elsewhere",
            ),
            (
                "[[routes]]\nname = \"git\"\npath_prefix = \"/g\"\nupstream = \"http://127.0.0.1:1\"\n[[mcp.servers]]\nname = \"git\"\ncommand = \"g\"\n",
                "mcp.servers[0].name`: `git` is already a route",
            ),
            (
                "[[oauth.identity_providers]]\nname = \"corp\"\nissuer = \"https://idp.example\"\njwks_uri = \"http://idp.example/keys\"\naudience = \"p\"\n",
                "oauth.identity_providers[0].jwks_uri`: `http://idp.example/keys` must use https://",
            ),
            (
                "[[oauth.identity_providers]]\nname = \"corp\"\nissuer = \"https://idp.example\"\njwks_uri = \"https://idp.example/keys\"\naudience = \"\"\n",
                "oauth.identity_providers[0].audience",
            ),
            (
                "[[routes]]\nname = \"t\"\npath_prefix = \"/t\"\nupstream = \"http://127.0.0.1:1\"\nagent_rate_limit = \"fast\"\n",
                "routes[0].agent_rate_limit",
            ),
            (
                "[[routes]]\nname = \"t\"\npath_prefix = \"/t\"\nupstream = \"http://127.0.0.1:1\"\nwrite_scope = \"t:read\"\n",
                "routes[0].write_scope",
            ),
            ("[server]\nlisten = \"nowhere\"\n", "server.listen"),
            (
                "[[routes]]\nname = \"t\"\npath_prefix = \"/api/x\"\nupstream = \"http://127.0.0.1:1\"\n",
                "shadow `/api`",
            ),
            (
                "[[routes]]\nname = \"t\"\npath_prefix = \"/t\"\nupstream = \"ftp://x\"\n",
                "routes[0].upstream",
            ),
            (
                "[[routes]]\nname = \"t\"\npath_prefix = \"/t\"\nupstream = \"http://h:1\"\n[[routes.rules]]\npath = \"/t/*\"\naction = \"nuke\"\n",
                "routes[0].rules[0].action",
            ),
            (
                "[[routes]]\nname = \"t\"\npath_prefix = \"/t\"\nupstream = \"http://h:1\"\n[[routes]]\nname = \"t\"\npath_prefix = \"/u\"\nupstream = \"http://h:1\"\n",
                "used twice",
            ),
            (
                "[[audit.sinks]]\nname = \"a\"\nkind = \"kafka\"\n",
                "audit.sinks[0].kind`: `kafka` is not one of file, http, syslog, otlp",
            ),
            (
                "[[audit.sinks]]\nname = \"a\"\nkind = \"file\"\n",
                "audit.sinks[0].path`: a file sink needs a path",
            ),
            (
                "[[audit.sinks]]\nname = \"a\"\nkind = \"file\"\npath = \"x\"\nurl = \"https://x\"\n",
                "audit.sinks[0].url`: not used by a `file` sink",
            ),
            (
                "[[audit.sinks]]\nname = \"a\"\nkind = \"http\"\nurl = \"http://siem.example/hec\"\n",
                "must use https://",
            ),
            (
                "[[audit.sinks]]\nname = \"a\"\nkind = \"syslog\"\naddress = \"h:514\"\nformat = \"json\"\n",
                "a `syslog` sink writes rfc5424 or cef, not `json`",
            ),
            (
                "[[audit.sinks]]\nname = \"a\"\nkind = \"syslog\"\naddress = \"h\"\n",
                "audit.sinks[0].address`: `h` is not host:port",
            ),
            (
                "[[audit.sinks]]\nname = \"a\"\nkind = \"file\"\npath = \"x\"\n[[audit.sinks]]\nname = \"a\"\nkind = \"file\"\npath = \"y\"\n",
                "audit.sinks[1].name`: `a` is used twice",
            ),
            (
                "[[audit.sinks]]\nname = \"a\"\nkind = \"file\"\npath = \"x\"\nkinds = [\"to*ken\"]\n",
                "audit.sinks[0].kinds`: `to*ken` is not an event kind",
            ),
            (
                "[audit]\nretention = \"30s\"\n",
                "audit.retention`: `30s` is not a duration",
            ),
            (
                "[[routes]]\nname = \"t\"\npath_prefix = \"/t\"\nupstream = \"http://h:1\"\n[[routes.credentials]]\nsecret = \"s\"\nkind = \"header\"\n",
                "routes[0].credentials[0].name`: a `header` credential needs the header name",
            ),
            (
                "[[routes]]\nname = \"t\"\npath_prefix = \"/t\"\nupstream = \"http://h:1\"\n[[routes.credentials]]\nsecret = \"s\"\nkind = \"bearer\"\n[[routes.credentials]]\nsecret = \"w\"\nkind = \"bearer\"\nactions = [\"write\"]\n",
                "another credential of the route already covers",
            ),
            (
                "[[routes]]\nname = \"t\"\npath_prefix = \"/t\"\nupstream = \"http://h:1\"\n[routes.inspection]\nenabled = false\n[[routes.credentials]]\nsecret = \"s\"\nkind = \"bearer\"\n",
                "keeps content inspection on",
            ),
            (
                "[vault]\nmaster_key_file = \"k\"\nmaster_key_env = \"K\"\n",
                "not both",
            ),
            (
                "[[mcp.servers]]\nname = \"g\"\ncommand = \"g\"\nenv = { T = \"${vault:bad name}\" }\n",
                "does not name a vault secret",
            ),
            (
                "[[vault.databases]]\nname = \"db\"\nurl = \"postgres://a@h/d\"\n[vault.databases.roles.r]\ncreation = [\"CREATE ROLE {{name}} LOGIN\"]\n",
                "must create {{name}} with VALID UNTIL {{expiry}}",
            ),
            (
                "[[vault.databases]]\nname = \"db\"\nurl = \"mysql://a@h/d\"\n[vault.databases.roles.r]\ncreation = [\"x\"]\n",
                "vault.databases[0].url",
            ),
            (
                "[[audit.sinks]]\nname = \"a\"\nkind = \"http\"\nurl = \"https://siem.example/\"\nheaders = { Authorization = \"${vault:siem/token}\" }\n",
                "not `${vault:...}`",
            ),
            ("this is not toml", "test.toml"),
        ];
        for (text, expected) in cases {
            let e = err(text);
            assert!(
                e.contains(expected),
                "for {text:?} expected {expected:?} in {e:?}"
            );
            assert!(e.starts_with("test.toml"), "{e}");
        }
    }

    #[test]
    fn unknown_nested_key_reports_its_path() {
        let e = err("[gateway]\nmax_body_bytes = 10\nmax_bdy = 1\n");
        assert!(e.contains("gateway"), "{e}");
        assert!(e.contains("max_bdy"), "{e}");
    }

    #[test]
    fn defaults_bind_loopback() {
        let c = Config::from_toml("", "defaults").unwrap();
        assert!(c.server.listen.ip().is_loopback());
        assert_eq!(c.oauth.access_token_ttl_secs, 900);
        assert_eq!(c.server.issuer, "http://127.0.0.1:8080");
    }

    #[test]
    fn routes_match_by_longest_prefix_and_rules_by_glob() {
        let c = Config::from_toml(
            "[[routes]]\nname = \"a\"\npath_prefix = \"/a\"\nupstream = \"http://h:1\"\n[[routes]]\nname = \"ab\"\npath_prefix = \"/a/b/\"\nupstream = \"http://h:1\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.route_for("/a/b/c").map(|r| r.name.as_str()), Some("ab"));
        assert_eq!(c.route_for("/a/bc").map(|r| r.name.as_str()), Some("a"));
        assert_eq!(c.route_for("/a").map(|r| r.name.as_str()), Some("a"));
        assert!(c.route_for("/ab").is_none());
        assert!(path_matches("/t/*/close", "/t/42/close"));
        assert!(!path_matches("/t/*/close", "/t/42/open"));
        assert!(path_matches("/t/**", "/t/1/2/3"));
        assert!(path_matches("/t/**", "/t"));
        assert!(!path_matches("/t/*", "/t"));
    }

    #[test]
    fn a_remote_mcp_credential_never_travels_in_clear_text_and_comes_from_the_environment() {
        let clear = "[[mcp.servers]]\nname = \"remote\"\nurl = \"http://mcp.example.com/mcp\"\nheaders = { Authorization = \"Bearer x\" }\n";
        let err = Config::from_toml(clear, "t").unwrap_err().to_string();
        assert!(
            err.contains("mcp.servers[0].headers") && err.contains("https://"),
            "{err}"
        );
        let loopback = clear.replace("mcp.example.com", "127.0.0.1:9");
        assert!(Config::from_toml(&loopback, "t").is_ok());
        let unset = "[[mcp.servers]]\nname = \"remote\"\nurl = \"https://mcp.example.com/mcp\"\nheaders = { Authorization = \"Bearer ${PALISADE_TEST_SURELY_UNSET}\" }\n";
        let err = Config::from_toml(unset, "t").unwrap_err().to_string();
        assert!(
            err.contains("PALISADE_TEST_SURELY_UNSET") && err.contains("not set"),
            "{err}"
        );
        let managed = "[[mcp.servers]]\nname = \"remote\"\nurl = \"https://mcp.example.com/mcp\"\nheaders = { Mcp-Session-Id = \"x\" }\n";
        let err = Config::from_toml(managed, "t").unwrap_err().to_string();
        assert!(err.contains("sets `Mcp-Session-Id` itself"), "{err}");
        let local = "[[mcp.servers]]\nname = \"local\"\ncommand = \"x\"\nheaders = { Authorization = \"Bearer x\" }\n";
        let err = Config::from_toml(local, "t").unwrap_err().to_string();
        assert!(err.contains("through `env`"), "{err}");
    }

    #[test]
    fn environment_references_expand_and_dollars_escape() {
        // PATH is set in every test environment.
        let path = std::env::var("PATH").unwrap();
        assert_eq!(expand_env("k", "a${PATH}b").unwrap(), format!("a{path}b"));
        assert_eq!(expand_env("k", "$$5 and $x").unwrap(), "$5 and $x");
        assert!(
            expand_env("k", "${PATH")
                .unwrap_err()
                .contains("not closed")
        );
        assert!(
            expand_env("k", "${A-B}")
                .unwrap_err()
                .contains("not an environment variable name")
        );
        let config = "[[mcp.servers]]\nname = \"remote\"\nurl = \"https://mcp.example.com/mcp\"\nheaders = { Authorization = \"Bearer ${PATH}\" }\n";
        let c = Config::from_toml(config, "t").unwrap();
        let (name, value) = &c.mcp.servers[0].headers[0];
        assert_eq!(name.as_str(), "authorization");
        assert_eq!(value.expose(), format!("Bearer {path}"));
        assert_eq!(format!("{value:?}"), "<redacted>");
    }
}
