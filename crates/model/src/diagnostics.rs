//! `GET /diagnostics/about` and `/diagnostics/health` answers, in the original API's field
//! names (`AboutInfo`, and the 3.x synchronous health object whose `*Error` fields are `null`
//! when healthy, which monitoring checks test one by one).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{EpochMillis, ErrorEnvelope};

/// `productName` in both answers.
pub const PRODUCT_NAME: &str = "sitegate";
/// `serviceType`: the original's service that answers the task and site API, which clients
/// compare against (`CLOUD`, `MANAGER`, ...).
pub const SERVICE_TYPE: &str = "CLOUD";

/// `GET /diagnostics/about`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AboutInfo {
    pub product_name: String,
    /// The version and the commit it was built from: `0.1.0-1a2b3c4d5e`.
    pub build_version: String,
    /// When that commit was made, epoch ms (0 when unknown).
    #[schema(value_type = i64)]
    pub build_date: EpochMillis,
    /// The site's instance ID: never changes, the same on every replica.
    pub instance_id: Uuid,
    pub service_type: String,
}

/// One peer link in a health answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerHealth {
    pub site: String,
    /// Why the link is failing, in either direction; `null` when healthy.
    pub error: Option<ErrorEnvelope>,
}

/// `GET /diagnostics/health`, and the `result` of `POST /diagnostics/health`'s task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthInfo {
    pub product_name: String,
    pub build_version: String,
    #[schema(value_type = i64)]
    pub build_date: EpochMillis,
    pub instance_id: Uuid,
    /// This process's ID: new on every start.
    pub runtime_id: Uuid,
    #[schema(value_type = i64)]
    pub current_time: EpochMillis,
    /// The client API's address.
    pub address: String,
    #[schema(value_type = i64)]
    pub service_boot_timestamp: EpochMillis,
    /// The task store does not answer; `null` when healthy.
    pub db_error: Option<ErrorEnvelope>,
    /// Some peer link is failing (`args` names the peers); `null` when all are healthy.
    pub peers_error: Option<ErrorEnvelope>,
    /// The peer-link certificate has expired or expires within 14 days; `null` otherwise.
    pub certificate_error: Option<ErrorEnvelope>,
    /// When the peer-link certificate expires, epoch ms; `null` without a peer link.
    #[schema(value_type = Option<i64>)]
    pub certificate_expiry: Option<EpochMillis>,
    pub peers: Vec<PeerHealth>,
}
