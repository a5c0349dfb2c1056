//! CRD schemas the Kubernetes API server accepts.
//!
//! weir's CRD types use serde's `deny_unknown_fields`, so a typo in a YAML config is an error naming the field, and
//! schemars renders that as `additionalProperties: false` next to `properties`. The API server refuses such a CRD
//! ("additionalProperties and properties are mutual exclusive", apiextensions.k8s.io/v1 structural schemas) and prunes
//! unknown fields anyway, so the generated schema drops the clause wherever `properties` is present.

use serde_json::Value;

/// Removes `additionalProperties` from every schema object in `schema` that also has `properties`.
pub fn structural(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.contains_key("properties") {
                map.remove("additionalProperties");
            }
            map.values_mut().for_each(structural);
        }
        Value::Array(items) => items.iter_mut().for_each(structural),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn drops_additional_properties_only_beside_properties() {
        let mut v = json!({
            "properties": {
                "spec": {"additionalProperties": false, "properties": {"a": {"type": "string"}}},
                "labels": {"additionalProperties": {"type": "string"}, "type": "object"}
            },
            "additionalProperties": false,
            "items": [{"additionalProperties": false, "properties": {}}]
        });
        structural(&mut v);
        assert_eq!(
            v,
            json!({
                "properties": {
                    "spec": {"properties": {"a": {"type": "string"}}},
                    "labels": {"additionalProperties": {"type": "string"}, "type": "object"}
                },
                "items": [{"properties": {}}]
            })
        );
    }
}
