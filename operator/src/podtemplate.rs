//! Merging a user's `spec.podTemplate` with the pod the operator generates.
//!
//! The user's template is the base and the operator's pod is merged over it: objects merge key
//! by key, lists of objects that carry a `name` (containers, env, volumes, volume mounts, ports)
//! merge item by item by name, and any other value is the operator's. So a user can add labels,
//! annotations, tolerations, sidecars, volumes and environment variables, and set anything the
//! operator leaves open, while the settings the job depends on stay the operator's.
use serde_json::Value;

/// Merges `ours` over `base`.
pub fn merge(base: &mut Value, ours: Value) {
    match (base, ours) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (Value::Array(b), Value::Array(o)) if named(b) && named(&o) => {
            for item in o {
                let name = item.get("name").cloned();
                match b.iter_mut().find(|x| x.get("name") == name.as_ref()) {
                    Some(existing) => merge(existing, item),
                    None => b.push(item),
                }
            }
        }
        (b, o) => *b = o,
    }
}

fn named(items: &[Value]) -> bool {
    items
        .iter()
        .all(|i| i.get("name").is_some_and(Value::is_string))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn containers_and_env_merge_by_name_and_the_operator_wins_on_conflicts() {
        let mut user = json!({
            "metadata": {"labels": {"team": "payments"}},
            "spec": {
                "tolerations": [{"key": "dedicated", "operator": "Exists"}],
                "containers": [
                    {"name": "taskmanager", "env": [{"name": "RUST_LOG", "value": "debug"}],
                     "image": "user/override:1"},
                    {"name": "sidecar", "image": "busybox"}
                ]
            }
        });
        let ours = json!({
            "metadata": {"labels": {"app.kubernetes.io/instance": "orders"}},
            "spec": {
                "containers": [
                    {"name": "taskmanager", "image": "freshet:1",
                     "env": [{"name": "POD_IP", "value": "x"}]}
                ]
            }
        });
        merge(&mut user, ours);
        assert_eq!(
            user,
            json!({
                "metadata": {"labels": {"team": "payments", "app.kubernetes.io/instance": "orders"}},
                "spec": {
                    "tolerations": [{"key": "dedicated", "operator": "Exists"}],
                    "containers": [
                        {"name": "taskmanager",
                         "env": [{"name": "RUST_LOG", "value": "debug"}, {"name": "POD_IP", "value": "x"}],
                         "image": "freshet:1"},
                        {"name": "sidecar", "image": "busybox"}
                    ]
                }
            })
        );
    }

    #[test]
    fn lists_without_names_are_replaced() {
        let mut user = json!({"args": ["a", "b"]});
        merge(&mut user, json!({"args": ["c"]}));
        assert_eq!(user, json!({"args": ["c"]}));
    }
}
