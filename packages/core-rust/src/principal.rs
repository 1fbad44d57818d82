use serde::{Deserialize, Serialize};

/// An authenticated identity: who a connection acts for and the roles it holds.
///
/// ```
/// use topgun_core::Principal;
///
/// let admin = Principal::new("alice", ["admin"]);
/// assert!(admin.has_role("admin"));
/// assert!(!admin.has_role("viewer"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Principal {
    /// Stable identifier of the user or service (for example a JWT `sub`).
    pub id: String,
    /// Roles granted to this principal, used by authorisation policies.
    #[serde(default)]
    pub roles: Vec<String>,
}

impl Principal {
    /// Creates a principal from an id and any list of role names.
    pub fn new<I, R>(id: impl Into<String>, roles: I) -> Self
    where
        I: IntoIterator<Item = R>,
        R: Into<String>,
    {
        Self { id: id.into(), roles: roles.into_iter().map(Into::into).collect() }
    }

    /// Whether this principal holds `role`.
    #[must_use]
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_roles_deserialize_as_empty() {
        let p: Principal = serde_json::from_str(r#"{"id":"svc"}"#).unwrap();
        assert_eq!(p, Principal::new("svc", Vec::<String>::new()));
    }

    #[test]
    fn msgpack_round_trip_keeps_roles() {
        let p = Principal::new("bob", ["reader", "writer"]);
        let bytes = rmp_serde::to_vec_named(&p).unwrap();
        assert_eq!(rmp_serde::from_slice::<Principal>(&bytes).unwrap(), p);
    }
}
