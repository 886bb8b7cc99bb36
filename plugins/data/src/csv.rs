//! `csv`: a numeric CSV table, one sample per row.
//!
//! Every column except the optional label column is a feature and must parse as a number. Fields
//! may be wrapped in double quotes (`""` inside escapes a quote). Blank lines are skipped. Without
//! `header`, the first row is taken as a header when any of its feature fields is not a number.
//! Labels are non-negative integers used as class indices, or, when any is not, names that are
//! numbered in sorted order. A seeded (stratified, when labelled) `test_fraction` of the rows is
//! held out. Values are kept as they are unless `scale` is set, which maps the observed range (or
//! `input_range`) onto [0, 1] or [-1, 1].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nash_core::data::{DataSource, DataSourceConfig};
use nash_core::error::{Error, Result};
use nash_core::tensor::FeatureShape;
use serde::{Deserialize, Serialize};

use crate::preprocess::{check_fraction, check_total, gather, observed_range, rescale, split_indices};
use crate::table::InMemoryData;
use crate::Scale;

/// Which column holds the labels: a header name or a 0-based index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LabelColumn {
    /// 0-based column index.
    Index(usize),
    /// Column name in the header row.
    Name(String),
}

/// A numeric CSV table (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CsvConfig {
    /// The CSV file.
    pub path: String,
    /// Whether the first row is a header; leave out to detect it.
    pub header: Option<bool>,
    /// The label column, by header name or 0-based index; leave out for unlabelled data.
    pub label_column: Option<LabelColumn>,
    /// The field separator, one character (`","`, `";"`, `"\t"`).
    pub delimiter: char,
    /// Fraction of rows held out for testing.
    pub test_fraction: f64,
    /// Seed of that split (fixed, so runs with different seeds evaluate on the same rows).
    pub split_seed: u64,
    /// Rescale features to `unit` [0, 1] or `symmetric` [-1, 1]; leave out to keep raw values.
    pub scale: Option<Scale>,
    /// The `[low, high]` range `scale` maps from (default: the observed range).
    pub input_range: Option<[f32; 2]>,
}

impl Default for CsvConfig {
    fn default() -> Self {
        CsvConfig {
            path: String::new(),
            header: None,
            label_column: None,
            delimiter: ',',
            test_fraction: 0.2,
            split_seed: 0,
            scale: None,
            input_range: None,
        }
    }
}

/// Splits one line into fields, honouring double quotes.
fn split_fields(line: &str, delimiter: char) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            c if c == delimiter && !quoted => fields.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    fields.push(field);
    fields.into_iter().map(|f| f.trim().to_string()).collect()
}

fn data_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

#[typetag::serde(name = "csv")]
impl DataSourceConfig for CsvConfig {
    fn build(&self, _seed: u64) -> Result<Box<dyn DataSource>> {
        if self.path.is_empty() {
            return Err(Error::config("data.path", "is required: the CSV file"));
        }
        if self.delimiter == '"' || self.delimiter == '\n' || self.delimiter == '\r' {
            return Err(Error::config(
                "data.delimiter",
                "cannot be a quote or a line break; use \",\", \";\", \"\\t\" or similar",
            ));
        }
        check_fraction("data.test_fraction", self.test_fraction)?;
        let path = PathBuf::from(&self.path);
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => data_err(&path, "not found; set `data.path` to an existing CSV file"),
            std::io::ErrorKind::InvalidData => data_err(&path, "is not UTF-8 text"),
            _ => Error::io(&path, e),
        })?;
        let mut rows = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (i + 1, split_fields(l, self.delimiter)));
        let Some((first_line, first)) = rows.next() else {
            return Err(data_err(&path, "is empty: expected rows of numbers"));
        };
        let width = first.len();
        // The label column's index, needing the header for names.
        let label_index = |names: Option<&[String]>| -> Result<Option<usize>> {
            match &self.label_column {
                None => Ok(None),
                Some(LabelColumn::Index(i)) if *i < width => Ok(Some(*i)),
                Some(LabelColumn::Index(i)) => Err(Error::config(
                    "data.label_column",
                    format!(
                        "column {i} does not exist: {} has {width} columns (0-based)",
                        path.display()
                    ),
                )),
                Some(LabelColumn::Name(n)) => match names {
                    Some(names) => names.iter().position(|h| h == n).map(Some).ok_or_else(|| {
                        Error::config(
                            "data.label_column",
                            format!("no column `{n}`; the header has {names:?}"),
                        )
                    }),
                    None => Err(Error::config(
                        "data.label_column",
                        format!("names column `{n}` but the file has no header row; give a 0-based index"),
                    )),
                },
            }
        };
        let header = match self.header {
            Some(h) => h,
            None => {
                // A header when some field that would be a feature is not a number.
                let guess = label_index(Some(&first)).ok().flatten();
                first
                    .iter()
                    .enumerate()
                    .any(|(j, f)| Some(j) != guess && f.parse::<f64>().is_err())
            }
        };
        let names: Vec<String> = if header {
            first.clone()
        } else {
            (0..width).map(|j| format!("column {j}")).collect()
        };
        let label_col = label_index(header.then_some(names.as_slice()))?;
        let dim = width - usize::from(label_col.is_some());
        if dim == 0 {
            return Err(data_err(&path, "has no feature column besides the label column"));
        }
        let body: Box<dyn Iterator<Item = (usize, Vec<String>)>> = if header {
            Box::new(rows)
        } else {
            Box::new(std::iter::once((first_line, first)).chain(rows))
        };
        let mut values = Vec::new();
        let mut raw_labels = Vec::new();
        for (line, fields) in body {
            if fields.len() != width {
                return Err(data_err(
                    &path,
                    format!(
                        "line {line}: {} fields, expected {width} like the first row (delimiter {:?})",
                        fields.len(),
                        self.delimiter
                    ),
                ));
            }
            for (j, f) in fields.into_iter().enumerate() {
                if Some(j) == label_col {
                    raw_labels.push((line, f));
                    continue;
                }
                let v: f32 = f.parse().map_err(|_| {
                    data_err(
                        &path,
                        format!("line {line}, column {j} (`{}`): `{f}` is not a number", names[j]),
                    )
                })?;
                values.push(v);
            }
        }
        let n = values.len() / dim;
        if n == 0 {
            return Err(data_err(&path, "has a header but no data rows"));
        }
        check_total(n, dim, &path)?;
        let what = path.as_path();
        // Integer labels are class indices; otherwise names numbered in sorted order.
        let (labels, class_names) = if label_col.is_some() {
            let ints: Option<Vec<usize>> = raw_labels.iter().map(|(_, l)| l.parse::<usize>().ok()).collect();
            match ints {
                Some(ints) => (Some(ints), None),
                None => {
                    let mut index: BTreeMap<&str, usize> = raw_labels.iter().map(|(_, l)| (l.as_str(), 0)).collect();
                    for (k, v) in index.values_mut().enumerate() {
                        *v = k;
                    }
                    let labels = raw_labels.iter().map(|(_, l)| index[l.as_str()]).collect();
                    (
                        Some(labels),
                        Some(index.keys().map(|s| s.to_string()).collect::<Vec<_>>()),
                    )
                }
            }
        } else {
            (None, None)
        };
        let range = observed_range([values.as_slice()], what)?.unwrap_or((0.0, 0.0));
        let value_range = match self.scale {
            None => {
                if self.input_range.is_some() {
                    return Err(Error::config(
                        "data.input_range",
                        "applies only together with `data.scale`",
                    ));
                }
                range
            }
            Some(scale) => {
                let from = match self.input_range {
                    Some([lo, hi]) if lo.is_finite() && hi.is_finite() && lo < hi => (lo, hi),
                    Some([lo, hi]) => {
                        return Err(Error::config(
                            "data.input_range",
                            format!("must be [low, high] with low < high, got [{lo}, {hi}]"),
                        ))
                    }
                    None => range,
                };
                rescale(&mut values, from, scale, what)?;
                scale.range()
            }
        };
        let (train, test) = split_indices(n, labels.as_deref(), self.test_fraction, self.split_seed)?;
        let num_classes = labels.as_ref().and_then(|l| l.iter().max()).map(|&m| m + 1);
        let description = format!(
            "csv: {} ({} train / {} test rows of {dim} features{}{})",
            self.path,
            train.len(),
            test.len(),
            num_classes.map_or(String::new(), |k| format!(", {k} classes")),
            class_names.map_or(String::new(), |c| format!(" {c:?}"))
        );
        let data = InMemoryData::new(
            description,
            FeatureShape::Flat(dim),
            Some(value_range),
            gather(&values, labels.as_deref(), dim, &train),
            gather(&values, labels.as_deref(), dim, &test),
            None,
        )?;
        Ok(Box::new(match num_classes {
            Some(k) => data.with_num_classes(k)?,
            None => data,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use nash_core::data::Split;
    use nash_core::tensor::Device;

    fn all(data: &dyn DataSource, split: Split) -> (Vec<f32>, Option<Vec<usize>>) {
        let idx: Vec<usize> = (0..data.len(split)).collect();
        let b = data.batch(split, &idx, &Device::default()).unwrap();
        (b.inputs.as_vec(), b.labels)
    }

    #[test]
    fn header_and_named_label_column() {
        let dir = TempDir::new("csv");
        let path = dir.write(
            "t.csv",
            b"a,label,b\n1,0,10\n2,1,20\n\n3,0,30\n4,1,40\n\"5\",0,50\n6,1,60\n7,0,70\n8,1,80\n9,0,90\n10,1,100\n",
        );
        let cfg = CsvConfig {
            path: path.display().to_string(),
            label_column: Some(LabelColumn::Name("label".into())),
            ..Default::default()
        };
        let data = cfg.build(0).unwrap();
        let info = data.info();
        assert_eq!(info.sample_shape, FeatureShape::Flat(2));
        assert_eq!((info.num_classes, info.value_range), (Some(2), (1.0, 100.0)));
        assert_eq!((data.len(Split::Train), data.len(Split::Test)), (8, 2));
        let (x, y) = all(data.as_ref(), Split::Train);
        let y = y.unwrap();
        for (s, &label) in y.iter().enumerate() {
            let a = x[2 * s];
            assert_eq!(x[2 * s + 1], 10.0 * a, "features stay paired");
            assert_eq!((a as usize + 1) % 2, label, "row a has label (a + 1) % 2");
        }
        // Same split by index, with an explicit header flag; symmetric scaling over [1, 100].
        let scaled = CsvConfig {
            label_column: Some(LabelColumn::Index(1)),
            header: Some(true),
            scale: Some(Scale::Symmetric),
            ..cfg.clone()
        }
        .build(0)
        .unwrap();
        assert_eq!(scaled.info().value_range, (-1.0, 1.0));
        let (xs, ys) = all(scaled.as_ref(), Split::Train);
        assert_eq!(ys.unwrap(), y);
        assert!((xs[0] - (2.0 * (x[0] - 1.0) / 99.0 - 1.0)).abs() < 1e-6);
    }

    #[test]
    fn headerless_semicolons_and_named_classes() {
        let dir = TempDir::new("csv-nohdr");
        let path = dir.write("t.csv", b"0.5;cat\n1.5;dog\n2.5;cat\n3.5;dog\n");
        let data = CsvConfig {
            path: path.display().to_string(),
            delimiter: ';',
            label_column: Some(LabelColumn::Index(1)),
            test_fraction: 0.5,
            ..Default::default()
        }
        .build(0)
        .unwrap();
        assert_eq!(data.info().num_classes, Some(2));
        assert_eq!(
            data.len(Split::Train) + data.len(Split::Test),
            4,
            "no row taken as a header"
        );
        let (x, y) = all(data.as_ref(), Split::Test);
        for (v, c) in x.iter().zip(y.unwrap()) {
            assert_eq!(
                c,
                usize::from(*v == 1.5 || *v == 3.5),
                "cat = 0, dog = 1 (sorted names)"
            );
        }
        let unlabelled = CsvConfig {
            path: dir.write("u.csv", b"1,2\n3,4\n5,6\n").display().to_string(),
            test_fraction: 0.34,
            ..Default::default()
        }
        .build(0)
        .unwrap();
        assert!(unlabelled.info().num_classes.is_none());
        assert_eq!(unlabelled.len(Split::Test), 1);
    }

    #[test]
    fn malformed_rows_name_file_line_and_column() {
        let dir = TempDir::new("csv-err");
        let cfg = |body: &[u8]| CsvConfig {
            path: dir.write("bad.csv", body).display().to_string(),
            label_column: Some(LabelColumn::Name("y".into())),
            ..Default::default()
        };
        let err = |c: CsvConfig| c.build(0).err().unwrap().to_string();
        let e = err(cfg(b"x,y\n1,0\n2,1\nzz,0\n"));
        assert!(
            e.contains("bad.csv") && e.contains("line 4, column 0 (`x`)") && e.contains("`zz`"),
            "{e}"
        );
        let e = err(cfg(b"x,y\n1,0\n2,1,3\n"));
        assert!(
            e.contains("bad.csv") && e.contains("line 3: 3 fields, expected 2"),
            "{e}"
        );
        let e = err(cfg(b"x,z\n1,0\n"));
        assert!(e.contains("data.label_column") && e.contains("no column `y`"), "{e}");
        let e = err(CsvConfig {
            label_column: Some(LabelColumn::Index(5)),
            ..cfg(b"1,0\n")
        });
        assert!(e.contains("column 5 does not exist"), "{e}");
        assert!(err(cfg(b"")).contains("empty"));
        let e = err(CsvConfig {
            path: dir.path().join("gone.csv").display().to_string(),
            ..Default::default()
        });
        assert!(e.contains("gone.csv") && e.contains("not found"), "{e}");
    }
}
