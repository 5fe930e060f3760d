//! The `switchyard` command line: configuration, logging, and the
//! composition root.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use switchyard_drivers::{OperatorPolicy, Registry};
use tracing_subscriber::EnvFilter;

use crate::{
    domain::SystemClock,
    server::{self, DEFAULT_HORIZON_DAYS},
};

/// Books control actions on home-energy devices, and never lets two
/// writers silently fight over a device.
#[derive(Debug, Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Books control actions on home-energy devices, and never lets two writers silently fight over a device.",
    after_help = "Log filter: SWITCHYARD_LOG or RUST_LOG (default: info), e.g. SWITCHYARD_LOG=debug."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// Log output format.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the gRPC server.
    Serve(ServeArgs),
    /// Apply database migrations and exit.
    Migrate {
        /// Database URL: `postgres://USER[:PASSWORD]@HOST:PORT/DATABASE`,
        /// `sqlite://PATH` (created if missing) or `sqlite::memory:`.
        #[arg(
            long = "database",
            env = "SWITCHYARD_DATABASE_URL",
            default_value = "sqlite://switchyard.db"
        )]
        database: String,
    },
    /// Manage tenants and API keys (docs/security.md), against the
    /// server's database; a running server sees the changes within seconds.
    Admin {
        /// Database URL, as for `serve`.
        #[arg(
            long = "database",
            env = "SWITCHYARD_DATABASE_URL",
            default_value = "sqlite://switchyard.db",
            value_name = "URL",
            global = true
        )]
        database: String,
        #[command(subcommand)]
        command: AdminCmd,
    },
}

/// `switchyard admin ...`.
#[derive(Debug, Subcommand)]
pub enum AdminCmd {
    /// Tenants: isolated accounts owning devices, actions and keys.
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// API keys: `authorization: Bearer sy_...` on every call.
    #[command(subcommand)]
    Key(KeyCmd),
}

/// `switchyard admin tenant ...`.
#[derive(Debug, Subcommand)]
pub enum TenantCmd {
    /// Create a tenant; prints its id.
    Create {
        /// 1 to 63 lower-case letters, digits, '-' or '_'.
        name: String,
        /// Requests per second each of its keys may make, per replica
        /// (default 50).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        rate_per_second: Option<u32>,
        /// Burst each of its keys may make (default 100).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        rate_burst: Option<u32>,
    },
    /// Change a tenant's per-key rate (an option left out goes back to
    /// the default).
    Update {
        name: String,
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        rate_per_second: Option<u32>,
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        rate_burst: Option<u32>,
    },
    /// List tenants: id, name, rate per second, burst.
    List,
}

/// `switchyard admin key ...`.
#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Create a key; prints the key (`sy_...`) alone on stdout, once: only
    /// its SHA-256 is kept.
    Create {
        /// The tenant's name.
        #[arg(long)]
        tenant: String,
        /// Comma-separated: devices:read, devices:write, actions:read,
        /// actions:write, admin.
        #[arg(long, value_name = "SCOPE,SCOPE")]
        scopes: String,
        /// How long it works: e.g. 90d, 12h, 30m, 3600s (default: until
        /// revoked).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        expires_in: Option<Duration>,
        /// What it is for (at most 256 bytes).
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List a tenant's keys (never the keys themselves).
    List {
        /// The tenant's name.
        #[arg(long)]
        tenant: String,
    },
    /// Revoke a key by its id (the 16 characters after `sy_`).
    Revoke { key_id: String },
}

/// `90d`, `12h`, `30m`, `45s` or a number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| "a duration is a number with d, h, m or s, e.g. 90d".to_owned())?;
    let secs = match unit {
        "d" => n.checked_mul(86_400),
        "h" => n.checked_mul(3_600),
        "m" => n.checked_mul(60),
        "s" => Some(n),
        _ => return Err("a duration is a number with d, h, m or s, e.g. 90d".to_owned()),
    }
    .ok_or_else(|| "too long".to_owned())?;
    if secs == 0 {
        return Err("must be positive".to_owned());
    }
    Ok(Duration::from_secs(secs))
}

/// Runs `switchyard admin ...`: what it prints goes to stdout, alone.
async fn admin(
    database: &str,
    command: AdminCmd,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use crate::api::admin as ops;
    check_database_url(database)?;
    let clock = SystemClock;
    let store = crate::store::Store::open(database, Arc::new(SystemClock))
        .await
        .map_err(|e| format!("--database {}: {e}", crate::store::redact_url(database)))?;
    let tenant_named = |name: String| {
        let store = store.clone();
        async move {
            store
                .tenant_by_name(&name)
                .await?
                .ok_or(crate::domain::Error::TenantNotFound { tenant: name })
        }
    };
    let done: Result<(), crate::domain::Error> = async {
        match command {
            AdminCmd::Tenant(TenantCmd::Create {
                name,
                rate_per_second,
                rate_burst,
            }) => {
                let t =
                    ops::create_tenant(&store, &clock, &name, rate_per_second, rate_burst).await?;
                println!("{}", t.id.as_str());
            }
            AdminCmd::Tenant(TenantCmd::Update {
                name,
                rate_per_second,
                rate_burst,
            }) => {
                let t = tenant_named(name).await?;
                store
                    .set_tenant_rate(&t.id, rate_per_second, rate_burst)
                    .await?;
                println!("{}", t.id.as_str());
            }
            AdminCmd::Tenant(TenantCmd::List) => {
                for t in store.list_tenants().await? {
                    let rate = |r: Option<u32>| r.map_or("default".to_owned(), |r| r.to_string());
                    println!(
                        "{}\t{}\t{}\t{}",
                        t.id.as_str(),
                        t.name,
                        rate(t.rate_per_second),
                        rate(t.rate_burst)
                    );
                }
            }
            AdminCmd::Key(KeyCmd::Create {
                tenant,
                scopes,
                expires_in,
                description,
            }) => {
                let t = tenant_named(tenant).await?;
                let scopes = crate::auth::Scope::parse_list(scopes.split(',')).map_err(|e| {
                    crate::domain::Error::invalid(
                        "--scopes",
                        crate::domain::Reason::InvalidField,
                        e,
                    )
                })?;
                let (k, key) =
                    ops::create_key(&store, &clock, &t, &scopes, expires_in, &description).await?;
                eprintln!(
                    "switchyard: created key {} for tenant {} ({}); it is shown once, below",
                    k.key_id,
                    t.name,
                    k.scopes.join(",")
                );
                println!("{key}");
            }
            AdminCmd::Key(KeyCmd::List { tenant }) => {
                let t = tenant_named(tenant).await?;
                let when = |t: Option<crate::domain::Ts>| t.map_or("-".to_owned(), |t| t.rfc3339());
                for k in store.list_keys(&t.id).await? {
                    println!(
                        "{}\t{}\tcreated {}\texpires {}\tlast used {}\trevoked {}\t{}",
                        k.key_id,
                        k.scopes.join(","),
                        k.created.rfc3339(),
                        when(k.expires),
                        when(k.last_used),
                        when(k.revoked),
                        k.description
                    );
                }
            }
            AdminCmd::Key(KeyCmd::Revoke { key_id }) => {
                if !crate::auth::is_key_id(&key_id) {
                    return Err(crate::domain::Error::invalid(
                        "KEY_ID",
                        crate::domain::Reason::InvalidField,
                        "a key id is the 16 characters after `sy_` in the key",
                    ));
                }
                match store
                    .revoke_key(&key_id, None, crate::domain::Clock::now(&clock))
                    .await?
                {
                    Some(k) => println!("revoked {}", k.key_id),
                    None => return Err(crate::domain::Error::ApiKeyNotFound { key_id }),
                }
            }
        }
        Ok(())
    }
    .await;
    store.close().await;
    done.map_err(|e| e.to_string().into())
}

/// `switchyard serve` options.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on, HOST:PORT (a host name is resolved; port 0
    /// picks a free port).
    #[arg(
        long,
        env = "SWITCHYARD_LISTEN",
        default_value = "127.0.0.1:50051",
        value_name = "HOST:PORT",
        value_parser = listen_syntax
    )]
    pub listen: String,
    /// Database URL: `postgres://USER[:PASSWORD]@HOST:PORT/DATABASE` (an
    /// existing database; several replicas may share it), `sqlite://PATH`
    /// (created if missing) or `sqlite::memory:`.
    #[arg(
        long = "database",
        env = "SWITCHYARD_DATABASE_URL",
        default_value = "sqlite://switchyard.db",
        value_name = "URL"
    )]
    pub database: String,
    /// PostgreSQL: most connections this replica's pool opens to the
    /// database (one more is the health check's own). A quarter of them
    /// write requests in groups by default (--database-write-lanes); the
    /// dispatcher records outcomes on up to N/8 (at least one). Every
    /// replica opens up to N+1: keep replicas at
    /// their most (autoscaling, rollouts) times N+1 under the server's
    /// `max_connections`. At least 4, so that reads and the dispatcher
    /// keep a connection beside a writer and a record. Not used on SQLite.
    #[arg(
        long,
        env = "SWITCHYARD_DATABASE_MAX_CONNECTIONS",
        default_value_t = 16,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(4..=1000)
    )]
    pub database_max_connections: u32,
    /// PostgreSQL: how many of the pool's connections write requests in
    /// groups (each a writer of its own, a request's chosen by its
    /// device). 0: a quarter of the pool (at least one). Fewer writers gather more pushes each,
    /// which they decide as batches (docs/performance.md); more let one
    /// device's wait for another replica's lock hold up fewer others. At
    /// most half of --database-max-connections. Not used on SQLite.
    #[arg(
        long,
        env = "SWITCHYARD_DATABASE_WRITE_LANES",
        default_value_t = 0,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(0..=500)
    )]
    pub database_write_lanes: u32,
    /// Do not create the demo devices on an empty database (default: an
    /// empty database gets three simulated demo devices).
    #[arg(long)]
    pub no_demo: bool,
    /// Log format.
    #[arg(
        long,
        env = "SWITCHYARD_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// How many days ahead an action may start.
    #[arg(long, env = "SWITCHYARD_HORIZON_DAYS", default_value_t = DEFAULT_HORIZON_DAYS, value_name = "DAYS",
          value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub horizon_days: u32,
    /// Seconds to let running calls finish on SIGTERM/SIGINT.
    #[arg(
        long,
        env = "SWITCHYARD_SHUTDOWN_GRACE_SECONDS",
        default_value_t = 10,
        value_name = "SECONDS"
    )]
    pub shutdown_grace_seconds: u64,
    /// How long a dispatch claim lasts: a replica that dies or stalls has
    /// its claimed work taken up by another after this long. Renewed every
    /// sixth of it while the work runs; a driver call is cut off after half
    /// of it.
    #[arg(
        long,
        env = "SWITCHYARD_DISPATCH_LEASE_SECONDS",
        default_value_t = 60,
        value_name = "SECONDS",
        value_parser = clap::value_parser!(u64).range(2..=3600)
    )]
    pub dispatch_lease_seconds: u64,
    /// How far ahead of its start work is claimed, with its device, so
    /// that a burst due at one instant (a tariff boundary) starts on time;
    /// claimed work stays SCHEDULED, and cancellable, until its start (a
    /// replica killed meanwhile holds it until its lease runs out). 0
    /// claims work only once it is due.
    #[arg(
        long,
        env = "SWITCHYARD_DISPATCH_HORIZON_SECONDS",
        default_value_t = 30,
        value_name = "SECONDS",
        value_parser = clap::value_parser!(u64).range(0..=60)
    )]
    pub dispatch_horizon_seconds: u64,
    /// Most driver calls in flight at once (each OEM account gets at most
    /// 32 of them): with a slow OEM, how late a burst due at one instant
    /// ends is about its size times the OEM's answer time divided by this.
    #[arg(
        long,
        env = "SWITCHYARD_DISPATCH_CONCURRENCY",
        default_value_t = 1024,
        value_name = "N",
        value_parser = clap::value_parser!(u64).range(1..=65536)
    )]
    pub dispatch_concurrency: u64,
    /// How many days finished actions (completed, failed, cancelled, with
    /// nothing owed) are kept after their last change, with their audit
    /// trail; 0 keeps them for ever.
    #[arg(
        long,
        env = "SWITCHYARD_RETENTION_DAYS",
        default_value_t = server::DEFAULT_RETENTION_DAYS,
        value_name = "DAYS",
        value_parser = clap::value_parser!(u32).range(0..=36_500)
    )]
    pub retention_days: u32,
    /// PostgreSQL: every how many seconds the service checks its busiest
    /// tables and runs ANALYZE on those that changed by more than
    /// autovacuum's analyse threshold since their statistics were last
    /// taken (so that plans stay right where autovacuum is off or has not
    /// come round yet); 0 leaves it to autovacuum alone. Needs the tables'
    /// ownership (the role that migrated them), the database's, or on
    /// PostgreSQL 17 and later MAINTAIN on them.
    #[arg(
        long,
        env = "SWITCHYARD_ANALYZE_EVERY_SECONDS",
        default_value_t = server::DEFAULT_ANALYZE_EVERY_SECONDS,
        value_name = "SECONDS",
        value_parser = clap::value_parser!(u64).range(0..=86_400)
    )]
    pub analyze_every_seconds: u64,
    /// Directory of the secrets devices may name as `file:<name>` in their
    /// `api_key_ref` (e.g. a Kubernetes Secret mounted as a directory).
    /// Unset: `file:` references are refused. `env:` references may name
    /// only variables beginning SWITCHYARD_SECRET_.
    #[arg(long, env = "SWITCHYARD_SECRETS_DIR", value_name = "DIR")]
    pub secrets_dir: Option<PathBuf>,
    /// An OEM endpoint prefix devices may use as `base_url`, besides each
    /// OEM's own cloud (e.g. http://127.0.0.1:8089 for the FoxESS
    /// emulator). `PREFIX=REF` pairs it with a secret (e.g.
    /// `http://127.0.0.1:8089=env:SWITCHYARD_SECRET_DEMO`): a paired
    /// endpoint receives only its paired secrets; a bare one, any.
    /// Repeatable; the variable takes a comma-separated list.
    #[arg(
        long = "oem-url-allow",
        env = "SWITCHYARD_OEM_URL_ALLOW",
        value_name = "PREFIX",
        value_delimiter = ','
    )]
    pub oem_url_allow: Vec<String>,
    /// A webhook URL prefix whose receivers may be on internal addresses
    /// (loopback, private, link-local, ...), which webhooks may not reach
    /// otherwise (e.g. http://127.0.0.1:9000 for a receiver on this
    /// host). Matched as `--oem-url-allow` prefixes are. Repeatable; the
    /// variable takes a comma-separated list.
    #[arg(
        long = "webhook-url-allow",
        env = "SWITCHYARD_WEBHOOK_URL_ALLOW",
        value_name = "PREFIX",
        value_delimiter = ','
    )]
    pub webhook_url_allow: Vec<String>,
    /// Milliseconds a webhook receiver has to answer a delivery.
    #[arg(long, env = "SWITCHYARD_WEBHOOK_TIMEOUT_MS", default_value_t = 10_000,
          value_name = "MS", value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub webhook_timeout_ms: u64,
    /// Milliseconds before the first retry of a failed delivery; each next
    /// wait is three times longer, at most 4 hours, with ±20% jitter.
    #[arg(long, env = "SWITCHYARD_WEBHOOK_RETRY_MIN_MS", default_value_t = 5_000,
          value_name = "MS", value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub webhook_retry_min_ms: u64,
    /// Hours an endpoint may keep failing before it is disabled (with an
    /// EVENT_TYPE_WEBHOOK_ENDPOINT_DISABLED event).
    #[arg(long, env = "SWITCHYARD_WEBHOOK_GIVE_UP_HOURS", default_value_t = 24,
          value_name = "HOURS", value_parser = clap::value_parser!(u64).range(1..=720))]
    pub webhook_give_up_hours: u64,
    /// Address to serve Prometheus metrics on, HOST:PORT (`GET /metrics`;
    /// docs/operations.md, "Metrics"). Unset: no metrics endpoint.
    #[arg(long, env = "SWITCHYARD_METRICS_LISTEN", value_name = "HOST:PORT",
          value_parser = listen_syntax)]
    pub metrics_listen: Option<String>,
    /// Most client connections at once; more are closed at once.
    #[arg(long, env = "SWITCHYARD_MAX_CONNECTIONS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Most concurrent streams (calls) per connection.
    #[arg(long, env = "SWITCHYARD_MAX_STREAMS_PER_CONNECTION", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,
    /// Most calls handled at once in the whole server; more are answered
    /// UNAVAILABLE / SERVER_BUSY.
    #[arg(long, env = "SWITCHYARD_MAX_IN_FLIGHT", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,
    /// Milliseconds a new connection has to send its HTTP/2 preface, and a
    /// call to send its whole request.
    #[arg(long, env = "SWITCHYARD_CLIENT_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..))]
    pub client_timeout_ms: u64,
}

impl ServeArgs {
    /// The server's resource bounds.
    pub fn limits(&self) -> crate::limits::Limits {
        let client = Duration::from_millis(self.client_timeout_ms);
        crate::limits::Limits {
            max_connections: self.max_connections as usize,
            max_streams_per_connection: self.max_streams_per_connection,
            max_in_flight: self.max_in_flight as usize,
            preface_timeout: client,
            body_timeout: client,
            ..Default::default()
        }
    }

    /// How webhooks are delivered; a startup error when a
    /// `--webhook-url-allow` prefix is malformed.
    pub fn delivery(&self) -> Result<crate::delivery::DeliveryConfig, String> {
        let mut allow = Vec::new();
        for p in self
            .webhook_url_allow
            .iter()
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
        {
            if p.contains('=') {
                return Err(format!(
                    "--webhook-url-allow {p:?}: a prefix takes no secret (no '=')"
                ));
            }
            OperatorPolicy::check_entry(p).map_err(|e| format!("--webhook-url-allow: {e}"))?;
            allow.push(p.to_owned());
        }
        Ok(crate::delivery::DeliveryConfig {
            policy: crate::webhooks::TargetPolicy { allow },
            timeout: Duration::from_millis(self.webhook_timeout_ms),
            retry_min: Duration::from_millis(self.webhook_retry_min_ms),
            give_up: Duration::from_secs(self.webhook_give_up_hours * 3600),
            ..Default::default()
        })
    }

    /// What devices may name, as the operator configured it; a startup
    /// error when the configuration itself is wrong.
    pub fn policy(&self) -> Result<OperatorPolicy, String> {
        if let Some(dir) = &self.secrets_dir
            && !dir.is_dir()
        {
            return Err(format!("--secrets-dir {}: not a directory", dir.display()));
        }
        let mut url_allow = Vec::new();
        for p in self
            .oem_url_allow
            .iter()
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
        {
            OperatorPolicy::check_entry(p).map_err(|e| format!("--oem-url-allow: {e}"))?;
            if !p.contains('=') {
                tracing::warn!(
                    prefix = p,
                    "--oem-url-allow without a paired secret: devices may send any of the \
                     operator's secrets there; pair it (PREFIX=env:SWITCHYARD_SECRET_NAME) \
                     unless every secret may go there"
                );
            }
            url_allow.push(p.to_owned());
        }
        Ok(OperatorPolicy {
            secrets_dir: self.secrets_dir.clone(),
            url_allow,
        })
    }
}

/// Checks a database URL before opening it, so that a wrong one is
/// named for what is wrong with it.
pub fn check_database_url(url: &str) -> Result<(), String> {
    if url == "sqlite::memory:" || url.starts_with("sqlite::memory:?") {
        return Ok(());
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        // Parsed as the driver will; the message never repeats a password.
        return url
            .parse::<sqlx::postgres::PgConnectOptions>()
            .map(|_| ())
            .map_err(|e| {
                format!(
                    "--database {}: not a PostgreSQL URL ({}); use postgres://USER[:PASSWORD]@HOST:PORT/DATABASE",
                    crate::store::redact_url(url),
                    crate::store::redact_url(&e.to_string())
                )
            });
    }
    let Some(rest) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    else {
        let scheme = url.split_once(':').map_or(url, |(s, _)| s);
        return Err(format!(
            "--database: unsupported database {scheme:?}; use postgres://USER@HOST:PORT/DATABASE (an existing database), sqlite://PATH (created if missing) or sqlite::memory:"
        ));
    };
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() {
        return Err("--database: the SQLite URL names no file; use sqlite://PATH".to_owned());
    }
    let parent = std::path::Path::new(path)
        .parent()
        .filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = parent
        && !dir.is_dir()
    {
        return Err(format!(
            "--database {url}: the directory {} does not exist",
            dir.display()
        ));
    }
    Ok(())
}

/// Checks `--listen` is HOST:PORT (a usage error otherwise); the host is
/// resolved when the server starts.
fn listen_syntax(s: &str) -> Result<String, String> {
    let ok = s.parse::<SocketAddr>().is_ok()
        || s.rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if ok {
        Ok(s.to_owned())
    } else {
        Err("must be HOST:PORT, e.g. 127.0.0.1:50051 or localhost:50051".to_owned())
    }
}

/// Resolves `--listen`: an IP address or a host name, with a port.
async fn listen_addr(listen: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = listen.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bad = |why: String| format!("--listen {listen:?}: {why}");
    if listen
        .rsplit_once(':')
        .is_none_or(|(_, port)| port.parse::<u16>().is_err())
    {
        return Err(bad(
            "must be HOST:PORT, e.g. 127.0.0.1:50051 or localhost:50051".into(),
        ));
    }
    let mut addrs = tokio::net::lookup_host(listen)
        .await
        .map_err(|e| bad(format!("cannot resolve the host: {e}")))?;
    addrs
        .next()
        .ok_or_else(|| bad("the host resolves to no address".into()))
}

/// Logs to stderr, and with `otel` (OTLP export on) turns spans into
/// OpenTelemetry spans too.
fn init_logging(
    format: LogFormat,
    otel: Option<
        tracing_opentelemetry::OpenTelemetryLayer<
            tracing_subscriber::Registry,
            opentelemetry_sdk::trace::Tracer,
        >,
    >,
) {
    use tracing_subscriber::{Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _};
    let filter = EnvFilter::try_from_env("SWITCHYARD_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    };
    // Spans are exported whatever the log level (SWITCHYARD_LOG=warn keeps
    // traces); only the server's own, not its libraries'.
    let otel = otel.map(|l| {
        l.with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target("switchyard", tracing::Level::INFO),
        )
    });
    tracing_subscriber::registry().with(otel).with(fmt).init();
}

/// Registers SIGTERM/SIGINT handlers now (so a signal that arrives while
/// starting up is not fatal) and resolves when one arrives.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => tracing::info!("SIGTERM received"),
                        _ = int.recv() => tracing::info!("SIGINT received"),
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Runs `switchyard serve`.
pub async fn serve(args: ServeArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (telemetry, otel) = crate::telemetry::init()?;
    init_logging(args.log_format, otel);
    if telemetry.traces() {
        tracing::info!("exporting traces and metrics over OTLP (OTEL_* variables)");
    }
    let shutdown = shutdown_signal();
    let policy = args.policy()?;
    let delivery = args.delivery()?;
    check_database_url(&args.database)?;
    if args.database_write_lanes > args.database_max_connections / 2 {
        return Err(format!(
            "--database-write-lanes {}: at most half of --database-max-connections ({})",
            args.database_write_lanes, args.database_max_connections
        )
        .into());
    }
    let listen = listen_addr(&args.listen).await?;
    let app = server::build_app_with(
        &args.database,
        Arc::new(SystemClock),
        Registry::builtin_with(&policy),
        args.horizon_days,
        &crate::store::StoreOptions {
            max_connections: args.database_max_connections,
            write_lanes: args.database_write_lanes,
            ..Default::default()
        },
    )
    .await
    .map_err(|e| {
        format!(
            "--database {}: {e}",
            crate::store::redact_url(&args.database)
        )
    })?;
    let mut app = app;
    app.retention_nanos = i64::from(args.retention_days) * 86_400 * crate::domain::Ts::SECOND;
    app.analyze_every = std::time::Duration::from_secs(args.analyze_every_seconds);
    app.webhooks = Arc::new(delivery);
    if !args.no_demo {
        let n = server::seed_demo(&app).await?;
        if n > 0 {
            tracing::info!(devices = n, "created demo devices on the empty database");
        }
    }
    let dispatcher = server::dispatcher(
        &app,
        crate::dispatch::DispatchConfig {
            lease_nanos: i64::try_from(args.dispatch_lease_seconds).unwrap_or(60)
                * crate::domain::Ts::SECOND,
            horizon_nanos: i64::try_from(args.dispatch_horizon_seconds).unwrap_or(30)
                * crate::domain::Ts::SECOND,
            concurrency: usize::try_from(args.dispatch_concurrency).unwrap_or(1024),
            ..Default::default()
        },
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("--listen {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    let metrics_addr = match &args.metrics_listen {
        None => None,
        Some(m) => {
            let at = listen_addr(m)
                .await
                .map_err(|e| e.replacen("--listen", "--metrics-listen", 1))?;
            let metrics = tokio::net::TcpListener::bind(at)
                .await
                .map_err(|e| format!("--metrics-listen {at}: {e}"))?;
            let bound = metrics.local_addr()?;
            let handle = crate::metrics::install()
                .ok_or("--metrics-listen: another metrics recorder is installed")?;
            tokio::spawn(crate::metrics::serve(metrics, handle));
            Some(bound)
        }
    };
    tracing::info!(
        %addr,
        database = %crate::store::redact_url(&args.database),
        secrets_dir = ?policy.secrets_dir,
        oem_url_allow = ?policy.url_allow,
        webhook_url_allow = ?app.webhooks.policy.allow,
        metrics_addr = %metrics_addr.map_or_else(String::new, |a| a.to_string()),
        "listening"
    );
    let served = server::serve(
        app,
        listener,
        &args.limits(),
        shutdown,
        Duration::from_secs(args.shutdown_grace_seconds),
        Some(dispatcher),
    )
    .await;
    telemetry.shutdown();
    served
}

/// Entry point shared by every binary that runs the service.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchyard: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Cmd::Serve(args) => serve(args).await,
            Cmd::Admin { database, command } => admin(&database, command).await,
            Cmd::Migrate { database } => match check_database_url(&database) {
                Err(e) => Err(e.into()),
                Ok(()) => crate::store::Store::migrate_only(&database, Arc::new(SystemClock))
                    .await
                    .map(|applied| {
                        if applied.is_empty() {
                            println!("switchyard: the database is up to date");
                        } else {
                            println!("switchyard: applied migrations {applied:?}");
                        }
                    })
                    .map_err(|e| {
                        format!("--database {}: {e}", crate::store::redact_url(&database)).into()
                    }),
            },
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
