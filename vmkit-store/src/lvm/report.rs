//! `lvs --reportformat json` output.

use serde::Deserialize;

/// The fields vmkit asks `lvs` for, in this order.
pub(super) const FIELDS: &str = "lv_name,vg_name,lv_size,pool_lv,origin,lv_attr";

/// One row of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Lv {
    pub(super) name: String,
    pub(super) vg: String,
    pub(super) size: u64,
    pub(super) pool: String,
    pub(super) origin: String,
    pub(super) attr: String,
}

impl Lv {
    /// Whether the volume's permission is read-only (`lv_attr` position 2 is `r`).
    pub(super) fn read_only(&self) -> bool {
        self.attr.as_bytes().get(1) == Some(&b'r')
    }

    /// Whether this is a thin pool (`lv_attr` starts with `t`).
    pub(super) fn thin_pool(&self) -> bool {
        self.attr.starts_with('t')
    }
}

#[derive(Deserialize)]
struct Report {
    report: Vec<Section>,
}

#[derive(Deserialize)]
struct Section {
    #[serde(default)]
    lv: Vec<Row>,
}

#[derive(Deserialize)]
struct Row {
    lv_name: String,
    vg_name: String,
    lv_size: Value,
    #[serde(default)]
    pool_lv: Value,
    #[serde(default)]
    origin: Value,
    #[serde(default)]
    lv_attr: Value,
}

/// A report value: `--reportformat json` prints strings, `json_std` numbers and
/// `null`.
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Value {
    Text(String),
    Number(u64),
    #[default]
    Null,
}

impl Value {
    fn text(self) -> String {
        match self {
            Value::Text(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Null => String::new(),
        }
    }
}

/// Parses the standard output of `lvs --reportformat json --units b --nosuffix`.
/// Anything printed before the JSON object is skipped.
pub(super) fn parse(stdout: &str) -> Result<Vec<Lv>, String> {
    let json = stdout
        .find('{')
        .map(|start| &stdout[start..])
        .ok_or_else(|| "no JSON report in the output".to_owned())?;
    let report: Report =
        serde_json::from_str(json).map_err(|e| format!("the report does not parse: {e}"))?;
    let mut lvs = Vec::new();
    for row in report.report.into_iter().flat_map(|s| s.lv) {
        let size_text = row.lv_size.text();
        let size = size_text.trim().parse::<u64>().map_err(|_| {
            format!(
                "lv_size {size_text:?} of {} is not a number of bytes (was --units b --nosuffix given?)",
                row.lv_name
            )
        })?;
        lvs.push(Lv {
            name: row.lv_name,
            vg: row.vg_name,
            size,
            pool: row.pool_lv.text(),
            origin: row.origin.text(),
            attr: row.lv_attr.text(),
        });
    }
    Ok(lvs)
}
