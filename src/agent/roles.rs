//! Who may call what: the one table mapping every RPC of the API to the roles allowed to call it.
//!
//! This module owns authorisation only. It never reads certificates (the role comes from
//! `pki::role_of` on a certificate rustls has already verified) and never performs a call.

use crate::pki::Role;

/// Every RPC of `keel.v1.Keel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rpc {
    Status,
    Version,
    InstallUpdate,
    Reboot,
    Rollback,
    GetConfig,
    ApplyConfig,
    ServiceList,
    ServiceRestart,
    Logs,
}

use Role::{Admin, Operator, Reader};

/// THE table. Admin may do everything; operator: reboot, service restart, logs, status;
/// reader: status, logs, config get. Version and the service list are read-only like status.
pub const POLICY: &[(Rpc, &[Role])] = &[
    (Rpc::Status, &[Admin, Operator, Reader]),
    (Rpc::Version, &[Admin, Operator, Reader]),
    (Rpc::InstallUpdate, &[Admin]),
    (Rpc::Reboot, &[Admin, Operator]),
    (Rpc::Rollback, &[Admin]),
    (Rpc::GetConfig, &[Admin, Reader]),
    (Rpc::ApplyConfig, &[Admin]),
    (Rpc::ServiceList, &[Admin, Operator, Reader]),
    (Rpc::ServiceRestart, &[Admin, Operator]),
    (Rpc::Logs, &[Admin, Operator, Reader]),
];

impl Rpc {
    pub const ALL: [Rpc; 10] = [
        Rpc::Status,
        Rpc::Version,
        Rpc::InstallUpdate,
        Rpc::Reboot,
        Rpc::Rollback,
        Rpc::GetConfig,
        Rpc::ApplyConfig,
        Rpc::ServiceList,
        Rpc::ServiceRestart,
        Rpc::Logs,
    ];

    /// The roles allowed to make this call (empty only if the table missed it: nobody may).
    pub fn allowed(self) -> &'static [Role] {
        POLICY
            .iter()
            .find(|(r, _)| *r == self)
            .map(|(_, roles)| *roles)
            .unwrap_or(&[])
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("{rpc:?} needs role {needed}; your certificate grants {have}")]
    WrongRole {
        rpc: Rpc,
        have: Role,
        /// The roles that may call it, e.g. "keel:admin or keel:operator".
        needed: String,
    },
    #[error(
        "{rpc:?} needs role {needed}; your certificate's Organization names no KeelOS role \
         (keel:admin, keel:operator or keel:reader)"
    )]
    NoRole { rpc: Rpc, needed: String },
}

/// Check a caller's role against the table.
pub fn authorize(rpc: Rpc, role: Option<Role>) -> Result<(), Denied> {
    let allowed = rpc.allowed();
    let needed = allowed
        .iter()
        .map(|r| r.organization())
        .collect::<Vec<_>>()
        .join(" or ");
    match role {
        Some(r) if allowed.contains(&r) => Ok(()),
        Some(have) => Err(Denied::WrongRole { rpc, have, needed }),
        None => Err(Denied::NoRole { rpc, needed }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rpc_is_in_the_table_once_and_admin_may_do_everything() {
        for rpc in Rpc::ALL {
            assert_eq!(
                POLICY.iter().filter(|(r, _)| *r == rpc).count(),
                1,
                "{rpc:?}"
            );
            assert!(authorize(rpc, Some(Admin)).is_ok());
            assert!(authorize(rpc, None).is_err());
        }
    }

    #[test]
    fn operator_and_reader_per_the_issue() {
        let op = [Rpc::Reboot, Rpc::ServiceRestart, Rpc::Logs, Rpc::Status];
        for rpc in op {
            assert!(authorize(rpc, Some(Operator)).is_ok(), "{rpc:?}");
        }
        for rpc in [
            Rpc::InstallUpdate,
            Rpc::ApplyConfig,
            Rpc::Rollback,
            Rpc::GetConfig,
        ] {
            assert!(authorize(rpc, Some(Operator)).is_err(), "{rpc:?}");
        }
        for rpc in [Rpc::Status, Rpc::Logs, Rpc::GetConfig] {
            assert!(authorize(rpc, Some(Reader)).is_ok(), "{rpc:?}");
        }
        for rpc in [
            Rpc::InstallUpdate,
            Rpc::Reboot,
            Rpc::ApplyConfig,
            Rpc::ServiceRestart,
        ] {
            assert!(authorize(rpc, Some(Reader)).is_err(), "{rpc:?}");
        }
        let e = authorize(Rpc::ApplyConfig, Some(Operator)).expect_err("denied");
        assert!(e.to_string().contains("keel:admin"), "{e}");
    }
}
