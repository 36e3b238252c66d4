//! Permissions and the one table that maps every RPC of the contract to exactly one of them.
//!
//! A permission is a group of RPCs that an operator grants as a unit: reading is one grant, and
//! each kind of write is its own grant so that, say, a reporting service can read everything but
//! change nothing, and only the CRM sync may delete customers. A unit test walks the contract's
//! descriptor set and fails when an RPC is missing here (or listed here but not in the contract),
//! so adding an RPC without deciding who may call it does not compile into a release.

use std::fmt;
use std::sync::LazyLock;

use crate::domain::writes::WRITE_PERMISSIONS;

/// What a caller may do. The names are the ones written in the callers file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    /// Every read: customers, companies, campaigns, templates, scores, feedback, reports, sent
    /// surveys, event mappings.
    Read,
    /// Create, update, unsubscribe and resubscribe customers; add and remove customer array items.
    CustomersWrite,
    /// Delete customers (kept apart from writes: it destroys data upstream).
    CustomersDelete,
    /// Send surveys (each send reaches a person, so it is granted on its own).
    SurveysSend,
    /// Replace the tags and topics of a feedback response.
    FeedbackWrite,
    /// Track events that start Retainly workflows.
    EventsWrite,
    /// Subscribe to the feedback stream.
    FeedbackSubscribe,
    /// Read the status of asynchronous writes and the dead-letter list.
    DeliveriesRead,
    /// Replay dead-lettered writes.
    DeliveriesRetry,
    /// See and replay every caller's deliveries, not only one's own. Guards no RPC of its own: it
    /// widens what `deliveries:read` and `deliveries:retry` reach, for operators.
    DeliveriesAdmin,
}

impl Permission {
    pub const ALL: [Permission; 10] = [
        Permission::Read,
        Permission::CustomersWrite,
        Permission::CustomersDelete,
        Permission::SurveysSend,
        Permission::FeedbackWrite,
        Permission::EventsWrite,
        Permission::FeedbackSubscribe,
        Permission::DeliveriesRead,
        Permission::DeliveriesRetry,
        Permission::DeliveriesAdmin,
    ];

    /// The name used in the callers file and in `ErrorInfo.metadata["permission"]`.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::CustomersWrite => "customers:write",
            Permission::CustomersDelete => "customers:delete",
            Permission::SurveysSend => "surveys:send",
            Permission::FeedbackWrite => "feedback:write",
            Permission::EventsWrite => "events:write",
            Permission::FeedbackSubscribe => "feedback:subscribe",
            Permission::DeliveriesRead => "deliveries:read",
            Permission::DeliveriesRetry => "deliveries:retry",
            Permission::DeliveriesAdmin => "deliveries:admin",
        }
    }

    pub fn parse(name: &str) -> Option<Permission> {
        Permission::ALL
            .into_iter()
            .find(|permission| permission.as_str() == name)
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of permissions as a bit set: checked on every call, so it costs one AND.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct PermissionSet(u16);

impl PermissionSet {
    pub fn contains(self, permission: Permission) -> bool {
        self.0 & permission.bit() != 0
    }

    pub fn insert(&mut self, permission: Permission) {
        self.0 |= permission.bit();
    }

    pub fn iter(self) -> impl Iterator<Item = Permission> {
        Permission::ALL
            .into_iter()
            .filter(move |permission| self.contains(*permission))
    }
}

impl FromIterator<Permission> for PermissionSet {
    fn from_iter<I: IntoIterator<Item = Permission>>(iter: I) -> Self {
        let mut set = PermissionSet::default();
        for permission in iter {
            set.insert(permission);
        }
        set
    }
}

impl fmt::Debug for PermissionSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.iter().map(Permission::as_str))
            .finish()
    }
}

/// The RPCs of `cx.gateway.v1` that write nothing, and the permission each needs; the write RPCs
/// declare theirs in the write path's table ([`WRITE_PERMISSIONS`]).
const READ_PERMISSIONS: &[(&str, Permission)] = &[
    // CustomerService
    (
        "/cx.gateway.v1.CustomerService/GetCustomer",
        Permission::Read,
    ),
    (
        "/cx.gateway.v1.CustomerService/ListCustomers",
        Permission::Read,
    ),
    (
        "/cx.gateway.v1.CustomerService/ListCompanies",
        Permission::Read,
    ),
    (
        "/cx.gateway.v1.CustomerService/GetCompany",
        Permission::Read,
    ),
    // SurveyService
    (
        "/cx.gateway.v1.SurveyService/ListCampaigns",
        Permission::Read,
    ),
    (
        "/cx.gateway.v1.SurveyService/ListTemplates",
        Permission::Read,
    ),
    ("/cx.gateway.v1.SurveyService/GetTemplate", Permission::Read),
    ("/cx.gateway.v1.SurveyService/GetScore", Permission::Read),
    (
        "/cx.gateway.v1.SurveyService/ListFeedback",
        Permission::Read,
    ),
    ("/cx.gateway.v1.SurveyService/GetFeedback", Permission::Read),
    (
        "/cx.gateway.v1.SurveyService/GetCustomerFeedbackHistory",
        Permission::Read,
    ),
    (
        "/cx.gateway.v1.SurveyService/ListSentSurveys",
        Permission::Read,
    ),
    ("/cx.gateway.v1.SurveyService/ListReports", Permission::Read),
    // EventService
    (
        "/cx.gateway.v1.EventService/ListEventMappings",
        Permission::Read,
    ),
    // FeedbackStream
    (
        "/cx.gateway.v1.FeedbackStream/Subscribe",
        Permission::FeedbackSubscribe,
    ),
    // DeliveryService
    (
        "/cx.gateway.v1.DeliveryService/GetDelivery",
        Permission::DeliveriesRead,
    ),
    (
        "/cx.gateway.v1.DeliveryService/ListDeadLetters",
        Permission::DeliveriesRead,
    ),
    (
        "/cx.gateway.v1.DeliveryService/RetryDeadLetters",
        Permission::DeliveriesRetry,
    ),
];

/// Every RPC of `cx.gateway.v1` and the one permission it needs, by full gRPC path.
pub static RPC_PERMISSIONS: LazyLock<Vec<(&'static str, Permission)>> = LazyLock::new(|| {
    WRITE_PERMISSIONS
        .iter()
        .chain(READ_PERMISSIONS)
        .copied()
        .collect()
});

/// The permission an RPC needs, by its full path; `None` for paths the contract does not have.
pub fn required_permission(path: &str) -> Option<Permission> {
    RPC_PERMISSIONS
        .iter()
        .find(|(rpc, _)| *rpc == path)
        .map(|(_, permission)| *permission)
}

/// Paths served to everyone, authenticated or not: Kubernetes probes and load balancers cannot
/// present tokens, and reflection describes only the public contract (it can be switched off
/// with `CXGW_REFLECTION=false`).
pub fn is_open(path: &str) -> bool {
    const OPEN_SERVICES: [&str; 3] = [
        "/grpc.health.v1.Health/",
        "/grpc.reflection.v1.ServerReflection/",
        "/grpc.reflection.v1alpha.ServerReflection/",
    ];
    OPEN_SERVICES.iter().any(|prefix| path.starts_with(prefix))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use prost::Message as _;

    use super::*;

    /// Every method of every service in the contract's descriptor set, as a full gRPC path.
    fn contract_rpcs() -> BTreeSet<String> {
        let set = prost_types::FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET)
            .expect("the embedded descriptor set decodes");
        let mut rpcs = BTreeSet::new();
        for file in set.file {
            let package = file.package().to_owned();
            for service in &file.service {
                for method in &service.method {
                    rpcs.insert(format!("/{package}.{}/{}", service.name(), method.name()));
                }
            }
        }
        rpcs
    }

    #[test]
    fn every_rpc_of_the_contract_is_mapped_exactly_once() {
        let contract = contract_rpcs();
        assert!(
            contract.len() >= 28,
            "descriptor set looks empty: {contract:?}"
        );
        let mapped: Vec<&str> = RPC_PERMISSIONS.iter().map(|(rpc, _)| *rpc).collect();
        let unique: BTreeSet<String> = mapped.iter().map(|rpc| (*rpc).to_owned()).collect();
        assert_eq!(unique.len(), mapped.len(), "an RPC is listed twice");
        let missing: Vec<_> = contract.difference(&unique).collect();
        assert!(missing.is_empty(), "RPCs without a permission: {missing:?}");
        let extra: Vec<_> = unique.difference(&contract).collect();
        assert!(
            extra.is_empty(),
            "mapped RPCs not in the contract: {extra:?}"
        );
    }

    #[test]
    fn every_permission_guards_some_rpc_and_round_trips_by_name() {
        // `deliveries:admin` widens the scope of the delivery RPCs instead of guarding one.
        for permission in Permission::ALL
            .into_iter()
            .filter(|p| *p != Permission::DeliveriesAdmin)
        {
            assert!(
                RPC_PERMISSIONS.iter().any(|(_, p)| *p == permission),
                "{permission} guards nothing"
            );
            assert_eq!(Permission::parse(permission.as_str()), Some(permission));
        }
        assert_eq!(
            Permission::parse("deliveries:admin"),
            Some(Permission::DeliveriesAdmin)
        );
        assert_eq!(Permission::parse("customers:drop"), None);
    }

    #[test]
    fn lookups_and_open_paths() {
        assert_eq!(
            required_permission("/cx.gateway.v1.SurveyService/SendSurvey"),
            Some(Permission::SurveysSend)
        );
        assert_eq!(
            required_permission("/cx.gateway.v1.CustomerService/DeleteCustomers"),
            Some(Permission::CustomersDelete)
        );
        assert_eq!(required_permission("/cx.gateway.v1.Nope/Nope"), None);
        assert!(is_open("/grpc.health.v1.Health/Check"));
        assert!(is_open(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!is_open("/cx.gateway.v1.SurveyService/SendSurvey"));
        assert!(!is_open("/grpc.health.v1.HealthX/Check"));
    }

    #[test]
    fn permission_sets_hold_what_was_inserted() {
        let set: PermissionSet = [Permission::Read, Permission::DeliveriesRetry]
            .into_iter()
            .collect();
        assert!(set.contains(Permission::Read));
        assert!(set.contains(Permission::DeliveriesRetry));
        assert!(!set.contains(Permission::SurveysSend));
        assert_eq!(format!("{set:?}"), r#"{"read", "deliveries:retry"}"#);
    }
}
