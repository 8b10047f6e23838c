//! The official cloud-hypervisor OpenAPI spec, loaded at test time, and a small
//! validator for the part of OpenAPI 3.0 schemas that the spec uses.
//!
//! Supported: `$ref` (local `#/...` pointers), `type` (object, array, string,
//! integer, number, boolean), `required`, `properties`, `additionalProperties`
//! (`false`, `true`/absent, or a schema), `items`, `enum`, integer `format`s
//! (int8..int64, uint8..uint64, checked as ranges), `minimum`, `maximum`,
//! `minLength`, `maxLength`, `nullable`. Annotations (`default`, `description`,
//! `deprecated`, ...) are ignored. Any other keyword makes validation fail with
//! "unsupported keyword", so a spec that grows a construct this validator does not
//! know can never pass silently.
//!
//! Properties that a schema does not declare are accepted where the spec allows
//! them (no `additionalProperties: false`), as cloud-hypervisor's serde does, but
//! are listed in [`Report::unknown`] so a test can insist that vmkit sends only
//! what the spec declares.

use std::path::{Path, PathBuf};

use serde_json::{Map, Number, Value};

/// Where the spec is: `$VMKIT_CH_SPEC`, else `shared/specs/cloud-hypervisor.yaml`
/// beside the workspace.
pub fn spec_path() -> PathBuf {
    std::env::var_os("VMKIT_CH_SPEC").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/specs/cloud-hypervisor.yaml"),
        PathBuf::from,
    )
}

/// The parsed spec.
#[derive(Debug, Clone)]
pub struct Spec {
    doc: Value,
}

/// An operation of the spec.
#[derive(Debug, Clone)]
pub struct Operation<'a> {
    /// The request body's schema, if the operation takes one.
    pub body: Option<&'a Value>,
    /// Whether the body is required.
    pub body_required: bool,
    /// The status codes the spec lists.
    pub responses: Vec<u16>,
    /// The schema of the 200 reply, if any.
    pub ok_schema: Option<&'a Value>,
}

/// What a path and method find in the spec.
#[derive(Debug)]
pub enum Lookup<'a> {
    /// No such path.
    NoPath,
    /// The path exists but not with this method.
    NoMethod,
    /// The operation.
    Found(Operation<'a>),
}

/// The outcome of validating one value.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Violations, each as `<json pointer>: <what>`.
    pub errors: Vec<String>,
    /// Properties the schema does not declare but allows.
    pub unknown: Vec<String>,
}

impl Report {
    /// No violations.
    pub fn is_valid(&self) -> bool {
        self.errors.is_empty()
    }

    /// No violations and no undeclared properties.
    pub fn is_strictly_valid(&self) -> bool {
        self.errors.is_empty() && self.unknown.is_empty()
    }
}

const ANNOTATIONS: &[&str] = &[
    "default",
    "description",
    "deprecated",
    "example",
    "title",
    "readOnly",
    "writeOnly",
];
const CONSTRAINTS: &[&str] = &[
    "$ref",
    "type",
    "format",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "nullable",
];

fn yaml_to_json(y: serde_norway::Value) -> Result<Value, String> {
    use serde_norway::Value as Y;
    Ok(match y {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                n.as_f64()
                    .and_then(Number::from_f64)
                    .map(Value::Number)
                    .ok_or_else(|| format!("number {n} has no JSON form"))?
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(seq) => Value::Array(
            seq.into_iter()
                .map(yaml_to_json)
                .collect::<Result<_, _>>()?,
        ),
        Y::Mapping(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                // Response codes are YAML integers; JSON keys are strings.
                let key = match k {
                    Y::String(s) => s,
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    other => return Err(format!("unsupported mapping key {other:?}")),
                };
                out.insert(key, yaml_to_json(v)?);
            }
            Value::Object(out)
        }
        Y::Tagged(t) => return Err(format!("unsupported YAML tag {}", t.tag)),
    })
}

impl Spec {
    /// Loads the spec from [`spec_path`].
    pub fn load() -> Result<Self, String> {
        let path = spec_path();
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "cannot read the cloud-hypervisor spec at {} (set VMKIT_CH_SPEC): {e}",
                path.display()
            )
        })?;
        Self::from_yaml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses a spec.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        let yaml: serde_norway::Value = serde_norway::from_str(text).map_err(|e| e.to_string())?;
        let doc = yaml_to_json(yaml)?;
        if doc.pointer("/paths").and_then(Value::as_object).is_none() {
            return Err("no paths".into());
        }
        Ok(Self { doc })
    }

    /// The schema `components/schemas/<name>`.
    pub fn component(&self, name: &str) -> Option<&Value> {
        self.doc.get("components")?.get("schemas")?.get(name)
    }

    /// Looks up `path` (such as `/vm.create`) with `method` (lower case).
    pub fn operation(&self, path: &str, method: &str) -> Lookup<'_> {
        let Some(item) = self.doc.get("paths").and_then(|p| p.get(path)) else {
            return Lookup::NoPath;
        };
        let Some(op) = item.get(method) else {
            return Lookup::NoMethod;
        };
        let body = op.get("requestBody");
        let schema = body.and_then(|b| b.pointer("/content/application~1json/schema"));
        let responses = op.get("responses").and_then(Value::as_object);
        Lookup::Found(Operation {
            body: schema,
            body_required: body
                .and_then(|b| b.get("required"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            responses: responses
                .map(|r| r.keys().filter_map(|k| k.parse().ok()).collect())
                .unwrap_or_default(),
            ok_schema: responses
                .and_then(|r| r.get("200"))
                .and_then(|r| r.pointer("/content/application~1json/schema")),
        })
    }

    /// Validates `value` against the component schema `name`.
    pub fn validate_component(&self, name: &str, value: &Value) -> Report {
        match self.component(name) {
            Some(schema) => self.validate(schema, value),
            None => Report {
                errors: vec![format!("the spec has no schema {name}")],
                unknown: Vec::new(),
            },
        }
    }

    /// Validates `value` against `schema` (a schema inside this spec).
    pub fn validate(&self, schema: &Value, value: &Value) -> Report {
        let mut report = Report::default();
        self.check(schema, value, "", &mut report, 0);
        report
    }

    fn resolve(&self, reference: &str) -> Option<&Value> {
        self.doc.pointer(reference.strip_prefix('#')?)
    }

    fn check(&self, schema: &Value, value: &Value, at: &str, out: &mut Report, depth: usize) {
        let here = if at.is_empty() { "/" } else { at };
        let mut fail = |what: String| out.errors.push(format!("{here}: {what}"));
        if depth > 64 {
            fail("schema nesting too deep".into());
            return;
        }
        let Some(schema) = schema.as_object() else {
            fail(format!("schema is not an object: {schema}"));
            return;
        };
        for key in schema.keys() {
            if !ANNOTATIONS.contains(&key.as_str()) && !CONSTRAINTS.contains(&key.as_str()) {
                fail(format!("unsupported keyword {key:?} in the spec"));
            }
        }
        if let Some(reference) = schema.get("$ref") {
            match reference.as_str().and_then(|r| self.resolve(r)) {
                Some(target) => self.check(target, value, at, out, depth + 1),
                None => fail(format!("unresolvable $ref {reference}")),
            }
            return;
        }
        if value.is_null() {
            if schema.get("nullable").and_then(Value::as_bool) != Some(true) {
                fail("null is not allowed".into());
            }
            return;
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
            && !allowed.contains(value)
        {
            fail(format!(
                "{value} is not one of {}",
                Value::from(allowed.clone())
            ));
        }
        match schema.get("type").and_then(Value::as_str) {
            None => {}
            Some("object") => self.check_object(schema, value, at, out, depth),
            Some("array") => match value.as_array() {
                None => fail(format!("expected an array, got {value}")),
                Some(items) => {
                    if let Some(item_schema) = schema.get("items") {
                        for (i, item) in items.iter().enumerate() {
                            self.check(item_schema, item, &format!("{at}/{i}"), out, depth + 1);
                        }
                    }
                }
            },
            Some("string") => match value.as_str() {
                None => fail(format!("expected a string, got {value}")),
                Some(s) => {
                    let len = u64::try_from(s.chars().count()).unwrap_or(u64::MAX);
                    if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                        && len < min
                    {
                        fail(format!("shorter than {min} characters"));
                    }
                    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                        && len > max
                    {
                        fail(format!("longer than {max} characters"));
                    }
                }
            },
            Some("integer") => {
                let Some(n) = value
                    .as_i64()
                    .map(i128::from)
                    .or_else(|| value.as_u64().map(i128::from))
                else {
                    fail(format!("expected an integer, got {value}"));
                    return;
                };
                let format = schema.get("format").and_then(Value::as_str);
                let range = match format {
                    Some("int8") => Some((i128::from(i8::MIN), i128::from(i8::MAX))),
                    Some("int16") => Some((i128::from(i16::MIN), i128::from(i16::MAX))),
                    Some("int32") => Some((i128::from(i32::MIN), i128::from(i32::MAX))),
                    Some("int64") => Some((i128::from(i64::MIN), i128::from(i64::MAX))),
                    Some("uint8") => Some((0, i128::from(u8::MAX))),
                    Some("uint16") => Some((0, i128::from(u16::MAX))),
                    Some("uint32") => Some((0, i128::from(u32::MAX))),
                    Some("uint64") => Some((0, i128::from(u64::MAX))),
                    None => None,
                    Some(other) => {
                        fail(format!("unsupported integer format {other:?} in the spec"));
                        None
                    }
                };
                if let Some((lo, hi)) = range
                    && (n < lo || n > hi)
                {
                    fail(format!("{n} is out of range for {}", format.unwrap_or("")));
                }
                check_bounds(schema, n as f64, &mut fail);
            }
            Some("number") => match value.as_f64() {
                None => fail(format!("expected a number, got {value}")),
                Some(x) => check_bounds(schema, x, &mut fail),
            },
            Some("boolean") if !value.is_boolean() => {
                fail(format!("expected a boolean, got {value}"));
            }
            Some("boolean") => {}
            Some(other) => fail(format!("unsupported type {other:?} in the spec")),
        }
    }

    fn check_object(
        &self,
        schema: &Map<String, Value>,
        value: &Value,
        at: &str,
        out: &mut Report,
        depth: usize,
    ) {
        let here = if at.is_empty() { "/" } else { at };
        let Some(object) = value.as_object() else {
            out.errors
                .push(format!("{here}: expected an object, got {value}"));
            return;
        };
        for name in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !object.contains_key(name) {
                out.errors
                    .push(format!("{here}: missing required property {name:?}"));
            }
        }
        let properties = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties");
        for (name, v) in object {
            let path = format!("{at}/{name}");
            match properties.and_then(|p| p.get(name)) {
                Some(prop) => self.check(prop, v, &path, out, depth + 1),
                None => match additional {
                    Some(Value::Bool(false)) => out
                        .errors
                        .push(format!("{here}: property {name:?} is not allowed")),
                    Some(extra @ Value::Object(_)) => self.check(extra, v, &path, out, depth + 1),
                    _ => out.unknown.push(path),
                },
            }
        }
    }
}

fn check_bounds(schema: &Map<String, Value>, x: f64, fail: &mut impl FnMut(String)) {
    if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
        && x < min
    {
        fail(format!("{x} is below the minimum {min}"));
    }
    if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
        && x > max
    {
        fail(format!("{x} is above the maximum {max}"));
    }
}
