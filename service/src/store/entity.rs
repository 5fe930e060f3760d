//! The tables as sea-orm entities: the one description of the schema the
//! store's statements are built from, rendered for SQLite or PostgreSQL.
//! Migrations (`schema.rs`) create what these describe; a column added
//! there is added here.
//!
//! Booleans are `INTEGER` 0/1 on SQLite and `BOOLEAN` on PostgreSQL;
//! instants are nanoseconds since the epoch in 64-bit integers.

/// `devices`: one row per registered device.
pub mod device {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "devices")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub device_id: String,
        pub display_name: String,
        pub family: String,
        pub driver: String,
        pub oem_device_id: String,
        pub timezone: String,
        /// Settings as a JSON object of strings.
        pub settings: String,
        pub revision: i64,
        pub create_ns: i64,
        pub update_ns: i64,
        /// The last observation (JSON), and when it was made.
        pub observed: Option<String>,
        pub observed_ns: Option<i64>,
        pub incarnation: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `actions`: one row per booked action, with what the dispatcher owes it.
pub mod action {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "actions")]
    pub struct Model {
        pub tenant_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub action_id: String,
        pub device_id: String,
        pub channel: String,
        pub command: String,
        pub power_value: Option<f64>,
        pub power_unit: Option<String>,
        pub target_value: Option<f64>,
        pub target_unit: Option<String>,
        pub reserve_value: Option<f64>,
        pub reserve_unit: Option<String>,
        pub start_ns: i64,
        pub end_ns: Option<i64>,
        pub immediate: bool,
        pub state: String,
        pub replaced_by: Option<String>,
        /// Comma-separated action ids.
        pub queued_after: String,
        pub error_code: Option<String>,
        pub error_message: Option<String>,
        pub revision: i64,
        pub create_ns: i64,
        pub update_ns: i64,
        /// APPLY, REVERT or NONE.
        pub work: String,
        pub due_ns: Option<i64>,
        pub lease_until_ns: Option<i64>,
        pub lease_owner: Option<String>,
        pub attempts: i64,
        pub clear_native: bool,
        pub oem_raw: Option<String>,
        pub verified: bool,
        pub driver_memo: Option<String>,
        pub fence: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `audit_log`: every change of every resource, append-only.
pub mod audit {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_log")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub seq: i64,
        pub tenant_id: String,
        pub device_id: String,
        pub action_id: Option<String>,
        pub from_state: Option<String>,
        pub to_state: String,
        pub reason: String,
        pub request_id: Option<String>,
        pub at_ns: i64,
        /// Its place among events, on PostgreSQL (migration 13).
        pub event_cursor: Option<i64>,
        /// The webhook endpoint an event is about (migration 15).
        pub endpoint_id: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `idempotency_keys`: a request_id's claim and, once done, its response.
pub mod idem_key {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "idempotency_keys")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub request_id: String,
        pub method: String,
        pub request_body: Vec<u8>,
        pub response_body: Option<Vec<u8>>,
        pub lease_until_ns: Option<i64>,
        pub claim: Option<String>,
        pub create_ns: i64,
        pub expire_ns: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `schema_migrations`: the migrations applied.
pub mod migration {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "schema_migrations")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub version: i64,
        pub applied_ns: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `rate_buckets`: an OEM account's token bucket.
pub mod rate_bucket {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "rate_buckets")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub account: String,
        pub tokens: f64,
        pub at_ns: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `device_writes`: when a device was last written to.
pub mod device_write {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "device_writes")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub device_key: String,
        pub last_ns: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `tenants`: isolated accounts (migration 12).
pub mod tenant {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "tenants")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: String,
        pub name: String,
        pub created_ns: i64,
        pub rate_per_second: Option<i64>,
        pub rate_burst: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `api_keys`: each tenant's API keys, by their SHA-256 (migration 12).
pub mod api_key {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "api_keys")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub key_id: String,
        pub tenant_id: String,
        pub key_hash: Vec<u8>,
        /// Comma-separated.
        pub scopes: String,
        pub description: String,
        pub created_ns: i64,
        pub expires_ns: Option<i64>,
        pub revoked_ns: Option<i64>,
        pub last_used_ns: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `event_horizon`: per tenant, the last event forgotten (migration 13).
pub mod event_horizon {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "event_horizon")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: String,
        pub pruned_through: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `webhook_endpoints`: a tenant's webhook receivers and where delivery to
/// each stands (migration 15).
pub mod webhook_endpoint {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "webhook_endpoints")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub endpoint_id: String,
        pub tenant_id: String,
        pub url: String,
        /// Comma-separated EventType names; empty: every type.
        pub event_types: String,
        pub description: String,
        pub enabled: bool,
        pub disabled_reason: Option<String>,
        /// The signing secret's bytes (never logged: no `Debug`).
        pub secret: Vec<u8>,
        pub previous_secret: Option<Vec<u8>>,
        pub previous_until_ns: Option<i64>,
        pub delivered_cursor: i64,
        pub attempts: i64,
        pub failing_since_ns: Option<i64>,
        pub next_attempt_ns: i64,
        pub lease_owner: Option<String>,
        pub lease_until_ns: Option<i64>,
        pub create_ns: i64,
        pub update_ns: i64,
    }

    impl std::fmt::Debug for Model {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("webhook_endpoint::Model")
                .field("endpoint_id", &self.endpoint_id)
                .field("tenant_id", &self.tenant_id)
                .field("enabled", &self.enabled)
                .field("delivered_cursor", &self.delivered_cursor)
                .finish_non_exhaustive()
        }
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `webhook_attempts`: the delivery log (migration 15).
pub mod webhook_attempt {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "webhook_attempts")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub attempt_id: i64,
        pub endpoint_id: String,
        pub tenant_id: String,
        pub event_cursor: i64,
        pub event_type: String,
        pub attempt: i64,
        pub at_ns: i64,
        pub outcome: String,
        pub http_status: i64,
        pub latency_us: i64,
        pub error: String,
        pub next_attempt_ns: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
