//! JSON device payloads: one reading object, `{"device_id", "readings": [...]}`, or an array.
//!
//! A reading's reserved keys are `device_id`, `seq`, `ts` (integer milliseconds since the epoch or
//! an RFC 3339 string), `metrics` (object) and `tags` (object). Every other key is a metric too, so
//! both `{"metrics":{"temp":21.5}}` and the flat `{"temp":21.5}` work; nested objects are flattened
//! with `.` (`{"gps":{"lat":1}}` → `gps.lat`), nulls are skipped, arrays are an error.
//!
//! The payload is read in one pass straight into records (serde visitors over the bytes, keys
//! borrowed from them), with no `serde_json::Value` in between. The error is the one of reading it
//! whole first: invalid JSON anywhere, then a batch's shape, then its number of readings, then each
//! reading in order; within an object, the bad value under the smallest key, so the error does not
//! depend on key order. A key given twice is applied twice: the last scalar wins and objects merge,
//! except `tags` and `readings`, which the last replaces; of two keys that flatten to the same
//! metric name, the later in the payload wins.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Number;
use weir_proto::{metric_value::Kind, MetricValue, Record};

use super::{check_reading_count, finish_record, DecodeContext, PayloadError};

/// Flattening stops here; deeper nesting is an error rather than a stack risk.
const MAX_DEPTH: usize = 8;

pub(super) fn decode(
    payload: &[u8],
    ctx: &DecodeContext<'_>,
    out: &mut Vec<Record>,
) -> Result<(), PayloadError> {
    let start = out.len();
    let mut parser = serde_json::Deserializer::from_slice(payload);
    // A semantic problem is an `Ok` outcome, so only invalid JSON (anywhere, trailing bytes
    // included) comes back as a serde_json error, and it wins over whatever the visitors found.
    let parsed = Expect(Document { payload, ctx, out: &mut *out })
        .deserialize(&mut parser)
        .and_then(|outcome| parser.end().map(|()| outcome));
    let result = match parsed {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(kind)) => Err(PayloadError::UnexpectedJson(kind)),
        Err(e) => Err(PayloadError::Json(e.to_string())),
    };
    if result.is_err() {
        // A batch's readings are pushed as they stream in; a later failure takes them back.
        out.truncate(start);
    }
    result
}

/// The whole payload: an array of readings, or an object that is one reading or a batch.
struct Document<'a> {
    payload: &'a [u8],
    ctx: &'a DecodeContext<'a>,
    out: &'a mut Vec<Record>,
}

impl<'de> Container<'de> for Document<'_> {
    type Output = Result<(), PayloadError>;

    fn array<A: SeqAccess<'de>>(self, seq: A) -> Result<Expected<Self::Output>, A::Error> {
        let batch = Batch::read(seq, self.ctx.limits.max_readings, self.out, &mut String::new())?;
        Ok(Ok(batch.finish("", self.payload, self.ctx, self.out)))
    }

    fn object<A: MapAccess<'de>>(self, mut map: A) -> Result<Expected<Self::Output>, A::Error> {
        let Document { payload, ctx, out } = self;
        // Scratch for the names of nested metrics (`gps.` while reading `{"gps":{"lat":1}}`).
        let mut prefix = String::new();
        // Read as a single reading until a `readings` key, which may come last, makes it a batch.
        let mut record = Record::default();
        let mut reading = ReadingBuilder { record: &mut record, error: FirstError::default() };
        let mut readings: Option<Expected<Batch>> = None;
        let mut device_id_is_string = true;
        // The key a batch error names: the smallest, as a decoder walking a sorted map finds it.
        let mut stray_key: Option<Cow<'de, str>> = None;
        while let Some(key) = map.next_key_seed(Key)? {
            match &*key {
                "readings" => {
                    // Given twice, the last one counts, as when the object is read whole.
                    if let Some(Ok(earlier)) = &readings {
                        out.truncate(earlier.start);
                    }
                    let items =
                        BatchItems { max: ctx.limits.max_readings, out: &mut *out, prefix: &mut prefix };
                    readings = Some(map.next_value_seed(Expect(items))?);
                }
                "device_id" => {
                    let value = map.next_value_seed(Shallow)?;
                    device_id_is_string = matches!(value, Scalar::String(_));
                    let checked = string_field("device_id", value).map(|id| reading.record.device_id = id);
                    reading.error.note(key, checked);
                }
                _ => {
                    if stray_key.as_ref().is_none_or(|stray| key < *stray) {
                        stray_key = Some(key.clone());
                    }
                    if readings.is_some() {
                        map.next_value_seed(Skip)?;
                    } else {
                        reading.field(key, &mut map, &mut prefix)?;
                    }
                }
            }
        }
        let outcome = match readings {
            None => reading
                .error
                .into_result()
                .and_then(|()| finish_record(record, "", payload, ctx).map(|record| out.push(record))),
            Some(Err(_)) => Err(invalid("readings", "must be an array of reading objects")),
            Some(Ok(_)) if !device_id_is_string => Err(invalid("device_id", "must be a string")),
            Some(Ok(batch)) => match stray_key {
                Some(key) => Err(invalid(&key, "a batch holds only `device_id` and `readings`")),
                None => batch.finish(&record.device_id, payload, ctx, out),
            },
        };
        Ok(Ok(outcome))
    }
}

/// A batch's readings as they stream in: decoded into `out` up to the limit, only counted past it.
struct Batch {
    /// Where this batch's records start in `out`.
    start: usize,
    count: usize,
    /// The first bad reading; the ones after it are only counted.
    error: Option<PayloadError>,
}

impl Batch {
    fn read<'de, A: SeqAccess<'de>>(
        mut seq: A,
        max_readings: usize,
        out: &mut Vec<Record>,
        prefix: &mut String,
    ) -> Result<Batch, A::Error> {
        let mut batch = Batch { start: out.len(), count: 0, error: None };
        loop {
            let more = if batch.count >= max_readings || batch.error.is_some() {
                // Only counted (and checked as JSON), so the limit error names the real count.
                seq.next_element_seed(Skip)?.is_some()
            } else {
                // Filled where it stays rather than moved out through the visitors.
                let slot = out.len();
                out.push(Record::default());
                let reading = ReadingObject { record: &mut out[slot], prefix: &mut *prefix };
                let (more, error) = match seq.next_element_seed(Expect(reading))? {
                    None => (false, None),
                    Some(Ok(Ok(()))) => (true, None),
                    Some(Ok(Err(e))) => (true, Some(e)),
                    Some(Err(kind)) => (true, Some(PayloadError::UnexpectedJson(kind))),
                };
                if !more || error.is_some() {
                    out.pop();
                }
                batch.error = error;
                more
            };
            if !more {
                return Ok(batch);
            }
            batch.count += 1;
        }
    }

    /// Checks the count, then finishes the readings in order up to the first bad one.
    fn finish(
        self,
        batch_device_id: &str,
        payload: &[u8],
        ctx: &DecodeContext<'_>,
        out: &mut [Record],
    ) -> Result<(), PayloadError> {
        check_reading_count(self.count, &ctx.limits)?;
        // Deferred to here because a batch's `device_id` may follow its readings.
        for record in &mut out[self.start..] {
            *record = finish_record(std::mem::take(record), batch_device_id, payload, ctx)?;
        }
        self.error.map_or(Ok(()), Err)
    }
}

/// The `readings` of a batch object.
struct BatchItems<'a> {
    max: usize,
    out: &'a mut Vec<Record>,
    prefix: &'a mut String,
}

impl<'de> Container<'de> for BatchItems<'_> {
    type Output = Batch;

    fn array<A: SeqAccess<'de>>(self, seq: A) -> Result<Expected<Batch>, A::Error> {
        Batch::read(seq, self.max, self.out, self.prefix).map(Ok)
    }
}

/// One reading of a batch.
struct ReadingObject<'a> {
    record: &'a mut Record,
    prefix: &'a mut String,
}

impl<'de> Container<'de> for ReadingObject<'_> {
    type Output = Result<(), PayloadError>;

    fn object<A: MapAccess<'de>>(self, mut map: A) -> Result<Expected<Self::Output>, A::Error> {
        let mut reading = ReadingBuilder { record: self.record, error: FirstError::default() };
        while let Some(key) = map.next_key_seed(Key)? {
            reading.field(key, &mut map, self.prefix)?;
        }
        Ok(Ok(reading.error.into_result()))
    }
}

/// One reading's fields as they stream in, and the first thing wrong with them.
struct ReadingBuilder<'a, 'de> {
    record: &'a mut Record,
    error: FirstError<'de>,
}

impl<'de> ReadingBuilder<'_, 'de> {
    /// Reads the value of `key`; a bad value is noted and the rest of the object still read.
    fn field<A: MapAccess<'de>>(
        &mut self,
        key: Cow<'de, str>,
        map: &mut A,
        prefix: &mut String,
    ) -> Result<(), A::Error> {
        let record = &mut *self.record;
        let checked = match &*key {
            "device_id" => {
                string_field("device_id", map.next_value_seed(Shallow)?).map(|id| record.device_id = id)
            }
            "seq" => seq_field(map.next_value_seed(Shallow)?).map(|seq| record.seq = Some(seq)),
            "ts" => timestamp_field(map.next_value_seed(Shallow)?).map(|ts| record.device_ts_ms = ts),
            "tags" => match map.next_value_seed(Expect(Tags))? {
                Ok(tags) => tags.map(|tags| record.tags = tags),
                Err(_) => Err(invalid("tags", "must be an object of name → string")),
            },
            "metrics" => {
                match map.next_value_seed(Expect(Metrics { metrics: &mut record.metrics, prefix }))? {
                    Ok(checked) => checked,
                    Err("null") => Ok(()),
                    Err(_) => Err(invalid("metrics", "must be an object of name → value")),
                }
            }
            _ => map.next_value_seed(Metric { metrics: &mut record.metrics, prefix, key: &key, depth: 1 })?,
        };
        self.error.note(key, checked);
        Ok(())
    }
}

/// The `metrics` object: each entry is a metric, flattened like a top-level one.
struct Metrics<'a> {
    metrics: &'a mut BTreeMap<String, MetricValue>,
    prefix: &'a mut String,
}

impl<'de> Container<'de> for Metrics<'_> {
    type Output = Result<(), PayloadError>;

    fn object<A: MapAccess<'de>>(self, map: A) -> Result<Expected<Self::Output>, A::Error> {
        metric_entries(map, self.metrics, self.prefix, 1).map(Ok)
    }
}

/// Adds each entry of `map` as a metric named `prefix` + its key, at nesting `depth`.
fn metric_entries<'de, A: MapAccess<'de>>(
    mut map: A,
    metrics: &mut BTreeMap<String, MetricValue>,
    prefix: &mut String,
    depth: usize,
) -> Result<Result<(), PayloadError>, A::Error> {
    let mut error = FirstError::default();
    while let Some(key) = map.next_key_seed(Key)? {
        let checked =
            map.next_value_seed(Metric { metrics: &mut *metrics, prefix: &mut *prefix, key: &key, depth })?;
        error.note(key, checked);
    }
    Ok(error.into_result())
}

/// The value of metric `prefix` + `key`; an object flattens into `prefix.key.child` metrics.
struct Metric<'a> {
    metrics: &'a mut BTreeMap<String, MetricValue>,
    /// The enclosing objects' names, each followed by `.`; empty at the top of a reading.
    prefix: &'a mut String,
    key: &'a str,
    depth: usize,
}

impl Metric<'_> {
    /// The one allocation a metric name needs: the map's own key.
    fn name(prefix: &str, key: &str) -> String {
        if prefix.is_empty() {
            key.to_owned()
        } else {
            [prefix, key].concat()
        }
    }

    fn insert(self, kind: Kind) -> Result<(), PayloadError> {
        self.metrics.insert(Self::name(self.prefix, self.key), MetricValue { kind: Some(kind) });
        Ok(())
    }

    fn number(self, n: f64) -> Result<(), PayloadError> {
        if n.is_finite() {
            self.insert(Kind::Number(n))
        } else {
            Err(self.invalid("number out of range"))
        }
    }

    fn invalid(self, reason: &'static str) -> PayloadError {
        PayloadError::InvalidField { field: Self::name(self.prefix, self.key), reason }
    }
}

impl<'de> DeserializeSeed<'de> for Metric<'_> {
    type Value = Result<(), PayloadError>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Metric<'_> {
    type Value = Result<(), PayloadError>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a metric value")
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Ok(()))
    }

    fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
        Ok(self.insert(Kind::Flag(b)))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Self::Value, E> {
        Ok(self.number(n as f64))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
        Ok(self.number(n as f64))
    }

    fn visit_f64<E>(self, n: f64) -> Result<Self::Value, E> {
        Ok(self.number(n))
    }

    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(self.insert(Kind::Text(s.to_owned())))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        skip_seq(seq)?;
        Ok(Err(self.invalid("arrays are not metric values (use a batch for many readings)")))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        if self.depth >= MAX_DEPTH {
            skip_map(map)?;
            return Ok(Err(self.invalid("nested too deeply")));
        }
        let outer = self.prefix.len();
        self.prefix.push_str(self.key);
        self.prefix.push('.');
        let checked = metric_entries(map, self.metrics, self.prefix, self.depth + 1)?;
        self.prefix.truncate(outer);
        Ok(checked)
    }
}

/// The `tags` object: scalar values as strings, nulls skipped.
struct Tags;

impl<'de> Container<'de> for Tags {
    type Output = Result<BTreeMap<String, String>, PayloadError>;

    fn object<A: MapAccess<'de>>(self, mut map: A) -> Result<Expected<Self::Output>, A::Error> {
        let mut tags = BTreeMap::new();
        let mut error = FirstError::default();
        while let Some(name) = map.next_key_seed(Key)? {
            let value = match map.next_value_seed(Shallow)? {
                Scalar::Null => continue,
                Scalar::String(s) => s.into_owned(),
                Scalar::Number(n) => n.to_string(),
                Scalar::Bool(b) => b.to_string(),
                Scalar::Array | Scalar::Object => {
                    let scalars_only = invalid(&name, "tag values must be scalars");
                    error.note(name, Err(scalars_only));
                    continue;
                }
            };
            tags.insert(name.into_owned(), value);
        }
        Ok(Ok(error.into_result().map(|()| tags)))
    }
}

fn string_field(field: &str, value: Scalar<'_>) -> Result<String, PayloadError> {
    match value {
        Scalar::String(s) => Ok(s.into_owned()),
        _ => Err(invalid(field, "must be a string")),
    }
}

fn seq_field(value: Scalar<'_>) -> Result<u64, PayloadError> {
    match value {
        Scalar::Number(n) => n.as_u64(),
        _ => None,
    }
    .ok_or_else(|| invalid("seq", "must be a non-negative integer"))
}

fn timestamp_field(value: Scalar<'_>) -> Result<Option<i64>, PayloadError> {
    let invalid = |reason| invalid("ts", reason);
    match value {
        Scalar::Null => Ok(None),
        Scalar::Number(n) => {
            n.as_i64().map(Some).ok_or_else(|| invalid("must be integer milliseconds since the Unix epoch"))
        }
        Scalar::String(s) => {
            let time =
                humantime::parse_rfc3339_weak(&s).map_err(|_| invalid("must be an RFC 3339 timestamp"))?;
            let millis = match time.duration_since(std::time::UNIX_EPOCH) {
                Ok(after) => i64::try_from(after.as_millis()),
                Err(before) => i64::try_from(before.duration().as_millis()).map(|m| -m),
            };
            millis.map(Some).map_err(|_| invalid("out of range"))
        }
        _ => Err(invalid("must be milliseconds or an RFC 3339 string")),
    }
}

/// Of the bad values in one object, the one under the smallest key: what a decoder walking each
/// object in key order meets first, whatever order the payload has them in.
#[derive(Default)]
struct FirstError<'de>(Option<(Cow<'de, str>, PayloadError)>);

impl<'de> FirstError<'de> {
    fn note(&mut self, key: Cow<'de, str>, checked: Result<(), PayloadError>) {
        if let Err(e) = checked {
            if self.0.as_ref().is_none_or(|(first, _)| key < *first) {
                self.0 = Some((key, e));
            }
        }
    }

    fn into_result(self) -> Result<(), PayloadError> {
        self.0.map_or(Ok(()), |(_, e)| Err(e))
    }
}

fn invalid(field: &str, reason: &'static str) -> PayloadError {
    PayloadError::InvalidField { field: field.to_owned(), reason }
}

/// A value, or the kind of JSON value found instead (`"a string"`), as
/// [`PayloadError::UnexpectedJson`] names it.
type Expected<T> = Result<T, &'static str>;

/// What a place that expects an object or an array reads from one. The other kinds, and the
/// container it does not take, are skipped and come back as their [`Expected`] kind.
trait Container<'de>: Sized {
    type Output;

    fn object<A: MapAccess<'de>>(self, map: A) -> Result<Expected<Self::Output>, A::Error> {
        skip_map(map)?;
        Ok(Err("an object"))
    }

    fn array<A: SeqAccess<'de>>(self, seq: A) -> Result<Expected<Self::Output>, A::Error> {
        skip_seq(seq)?;
        Ok(Err("an array"))
    }
}

/// Reads one JSON value with a [`Container`].
struct Expect<C>(C);

impl<'de, C: Container<'de>> DeserializeSeed<'de> for Expect<C> {
    type Value = Expected<C::Output>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, C: Container<'de>> Visitor<'de> for Expect<C> {
    type Value = Expected<C::Output>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object or array")
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Err("null"))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Err("a boolean"))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Err("a number"))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Err("a number"))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Err("a number"))
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Err("a string"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        self.0.array(seq)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.object(map)
    }
}

/// A JSON value as a scalar field sees it: an array's or object's contents are skipped.
enum Scalar<'de> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'de, str>),
    Array,
    Object,
}

/// Reads a [`Scalar`], borrowing a string from the payload unless it has escapes.
struct Shallow;

impl<'de> DeserializeSeed<'de> for Shallow {
    type Value = Scalar<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Shallow {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Self::Value, E> {
        Ok(Scalar::Number(n.into()))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
        Ok(Scalar::Number(n.into()))
    }

    fn visit_f64<E>(self, n: f64) -> Result<Self::Value, E> {
        // As `serde_json::Value` reads it: a non-finite float (which the parser never yields) is null.
        Ok(Number::from_f64(n).map_or(Scalar::Null, Scalar::Number))
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::String(Cow::Borrowed(s)))
    }

    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Scalar::String(Cow::Owned(s.to_owned())))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        skip_seq(seq)?;
        Ok(Scalar::Array)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        skip_map(map)?;
        Ok(Scalar::Object)
    }
}

/// An object key, borrowed from the payload unless it has escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(s))
    }

    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(s.to_owned()))
    }
}

/// Consumes one JSON value. Unlike `serde::de::IgnoredAny` it goes through `deserialize_any`, so
/// the value is checked exactly as reading it would check it (UTF-8, number range, depth).
struct Skip;

impl<'de> DeserializeSeed<'de> for Skip {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Skip {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        skip_seq(seq)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        skip_map(map)
    }
}

fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element_seed(Skip)?.is_some() {}
    Ok(())
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry_seed(Skip, Skip)?.is_some() {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::ctx;
    use super::*;
    use weir_proto::SourceProtocol;

    fn one(payload: &str) -> Result<Record, PayloadError> {
        let mut out = Vec::new();
        decode(payload.as_bytes(), &ctx(), &mut out)?;
        assert_eq!(out.len(), 1);
        Ok(out.pop().unwrap())
    }

    fn number(r: &Record, name: &str) -> f64 {
        match r.metrics[name].kind {
            Some(Kind::Number(n)) => n,
            ref other => panic!("{name} is {other:?}"),
        }
    }

    #[test]
    fn full_reading_with_reserved_keys() {
        let r = one(r#"{"device_id":"d1","seq":42,"ts":1700000000000,
                "metrics":{"temp":21.5,"on":true,"mode":"eco"},"tags":{"site":"a","floor":3}}"#)
        .unwrap();
        assert_eq!(r.device_id, "d1");
        assert_eq!(r.seq, Some(42));
        assert_eq!(r.device_ts_ms, Some(1_700_000_000_000));
        assert_eq!(number(&r, "temp"), 21.5);
        assert_eq!(r.metrics["on"].kind, Some(Kind::Flag(true)));
        assert_eq!(r.metrics["mode"].kind, Some(Kind::Text("eco".into())));
        assert_eq!(r.tags["floor"], "3");
        assert_eq!(r.received_ts_ms, 1_700_000_000_123);
        assert_eq!(r.protocol, SourceProtocol::Mqtt as i32);
        assert_eq!(r.source, "devices/client-7/telemetry");
    }

    #[test]
    fn flat_reading_takes_device_id_from_connection_and_flattens_objects() {
        let r = one(r#"{"temp":20,"gps":{"lat":1.5,"lon":{"deg":2}},"note":null}"#).unwrap();
        assert_eq!(r.device_id, "client-7");
        assert_eq!(r.seq, None);
        assert_eq!(number(&r, "temp"), 20.0);
        assert_eq!(number(&r, "gps.lat"), 1.5);
        assert_eq!(number(&r, "gps.lon.deg"), 2.0);
        assert!(!r.metrics.contains_key("note"));
    }

    #[test]
    fn rfc3339_timestamp() {
        let r = one(r#"{"ts":"2023-11-14T22:13:20.5Z","v":1}"#).unwrap();
        assert_eq!(r.device_ts_ms, Some(1_700_000_000_500));
    }

    #[test]
    fn batch_object_and_array_forms() {
        let mut out = Vec::new();
        let batch = r#"{"device_id":"gw","readings":[{"seq":1,"v":1},{"device_id":"d2","seq":2,"v":2}]}"#;
        decode(batch.as_bytes(), &ctx(), &mut out).unwrap();
        assert_eq!(out.iter().map(|r| r.device_id.as_str()).collect::<Vec<_>>(), ["gw", "d2"]);
        out.clear();
        decode(br#"[{"seq":1},{"seq":2}]"#, &ctx(), &mut out).unwrap();
        assert_eq!(out.iter().map(|r| r.seq).collect::<Vec<_>>(), [Some(1), Some(2)]);
        assert!(out.iter().all(|r| r.device_id == "client-7"));
    }

    #[test]
    fn errors_name_the_field_and_reason() {
        let cases = [
            (r#"{"seq":-1}"#, "field `seq`: must be a non-negative integer"),
            (r#"{"seq":"1"}"#, "field `seq`: must be a non-negative integer"),
            (r#"{"ts":"yesterday"}"#, "field `ts`: must be an RFC 3339 timestamp"),
            (r#"{"device_id":5}"#, "field `device_id`: must be a string"),
            (r#"{"v":[1,2]}"#, "field `v`: arrays are not metric values (use a batch for many readings)"),
            (r#"{"tags":{"a":{}}}"#, "field `a`: tag values must be scalars"),
            (r#"{"readings":{}}"#, "field `readings`: must be an array of reading objects"),
            (r#"{"readings":[],"x":1}"#, "field `x`: a batch holds only `device_id` and `readings`"),
            (r#"[1]"#, "expected a JSON object or array of readings, found a number"),
            (r#""hi""#, "expected a JSON object or array of readings, found a string"),
            (r#"{"seq":9223372036854775808}"#, "seq 9223372036854775808 is larger than 2^63-1"),
        ];
        for (payload, want) in cases {
            assert_eq!(one(payload).unwrap_err().to_string(), want, "payload {payload}");
        }
        assert!(matches!(one("{\"a\":"), Err(PayloadError::Json(_))));
        assert!(matches!(one("\u{0}\u{1}"), Err(PayloadError::Json(_))));
    }

    #[test]
    fn limits_are_enforced() {
        let mut c = ctx();
        c.limits.max_readings = 2;
        c.limits.max_fields = 2;
        c.limits.max_device_id_len = 3;
        let mut out = Vec::new();
        let err = |p: &str, out: &mut Vec<Record>| decode(p.as_bytes(), &c, out).unwrap_err();
        let readings = r#"{"device_id":"abc","readings":[{},{},{}]}"#;
        assert_eq!(err(readings, &mut out), PayloadError::TooManyReadings { count: 3, max: 2 });
        let fields = r#"{"device_id":"abc","a":1,"b":2,"c":3}"#;
        assert_eq!(err(fields, &mut out), PayloadError::TooManyFields { count: 3, max: 2 });
        let long = r#"{"device_id":"long"}"#;
        assert_eq!(err(long, &mut out), PayloadError::DeviceIdTooLong { len: 4, max: 3 });
        // The connection's id ("client-7") is held to the same limit.
        assert_eq!(err(r#"{"a":1}"#, &mut out), PayloadError::DeviceIdTooLong { len: 8, max: 3 });
        let deep = format!("{}1{}", r#"{"a":"#.repeat(20), "}".repeat(20));
        assert!(matches!(err(&deep, &mut out), PayloadError::InvalidField { .. }));
        assert!(out.is_empty());
    }

    #[test]
    fn missing_device_id_without_fallback() {
        let mut c = ctx();
        c.fallback_device_id = "";
        let mut out = Vec::new();
        assert_eq!(decode(b"{}", &c, &mut out), Err(PayloadError::MissingDeviceId));
    }

    fn seqs(out: &[Record]) -> Vec<Option<u64>> {
        out.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn batch_or_single_is_decided_at_the_end_of_the_object() {
        let mut out = Vec::new();
        let late_id = r#"{"readings":[{"seq":1},{"device_id":"d2","seq":2}],"device_id":"gw"}"#;
        decode(late_id.as_bytes(), &ctx(), &mut out).unwrap();
        assert_eq!(out.iter().map(|r| r.device_id.as_str()).collect::<Vec<_>>(), ["gw", "d2"]);
        out.clear();
        // Given twice, the last `readings` counts.
        decode(br#"{"readings":[{"seq":1}],"readings":[{"seq":2},{"seq":3}]}"#, &ctx(), &mut out).unwrap();
        assert_eq!(seqs(&out), [Some(2), Some(3)]);

        let cases = [
            // Keys before `readings` were reading fields until then; in a batch they are strays.
            (r#"{"seq":-1,"readings":[]}"#, "field `seq`: a batch holds only `device_id` and `readings`"),
            (
                r#"{"zz":1,"a":[1],"readings":[{}]}"#,
                "field `a`: a batch holds only `device_id` and `readings`",
            ),
            (
                r#"{"readings":[{"seq":-1}],"x":1}"#,
                "field `x`: a batch holds only `device_id` and `readings`",
            ),
            (
                r#"{"x":1,"device_id":5,"readings":7}"#,
                "field `readings`: must be an array of reading objects",
            ),
            (r#"{"x":1,"device_id":5,"readings":[]}"#, "field `device_id`: must be a string"),
            (r#"{"readings":[{},7]}"#, "expected a JSON object or array of readings, found a number"),
        ];
        for (payload, want) in cases {
            assert_eq!(one(payload).unwrap_err().to_string(), want, "payload {payload}");
        }
    }

    #[test]
    fn errors_are_those_of_reading_the_payload_whole_first() {
        let mut c = ctx();
        c.limits.max_readings = 2;
        c.limits.max_device_id_len = 3;
        let err = |p: &str| decode(p.as_bytes(), &c, &mut Vec::new()).unwrap_err();
        // Invalid JSON anywhere wins over a bad field before it.
        for broken in
            [r#"{"seq":-1,"#, r#"{"seq":-1} x"#, r#"{"seq":-1,"v":1e400}"#, "[{\"seq\":-1},\"\x01\"]"]
        {
            assert!(matches!(err(broken), PayloadError::Json(_)), "payload {broken}");
        }
        // The limit names every reading, decoded or not, and wins over a bad one.
        let too_many = r#"[{"seq":-1},{},{"v":[1]},{}]"#;
        assert_eq!(err(too_many), PayloadError::TooManyReadings { count: 4, max: 2 });
        // Readings in order: the first one's device id before the second one's field.
        let two_bad = r#"[{"device_id":"long"},{"seq":-1}]"#;
        assert_eq!(err(two_bad), PayloadError::DeviceIdTooLong { len: 4, max: 3 });
        // Within a reading, the bad field with the smallest key, at each level of nesting.
        assert_eq!(err(r#"{"v":[1],"seq":-1}"#).to_string(), "field `seq`: must be a non-negative integer");
        assert_eq!(err(r#"{"tags":{"b":[],"a":{}}}"#).to_string(), "field `a`: tag values must be scalars");
        let nested = r#"{"g":{"y":[1],"x":{"b":[1],"a":[2]}}}"#;
        assert_eq!(
            err(nested).to_string(),
            "field `g.x.a`: arrays are not metric values (use a batch for many readings)"
        );
    }

    #[test]
    fn a_failed_batch_leaves_output_untouched() {
        let mut out = vec![Record::default()];
        assert!(decode(br#"[{"seq":1},{"seq":-1}]"#, &ctx(), &mut out).is_err());
        assert!(decode(br#"{"readings":[{"seq":1}],"x":1}"#, &ctx(), &mut out).is_err());
        assert!(decode(br#"[{"seq":1}] x"#, &ctx(), &mut out).is_err());
        assert_eq!(out, [Record::default()]);
    }

    #[test]
    fn escaped_keys_and_strings() {
        let r = one(
            r#"{"t\u0065mp":1,"m\u0065trics":{"a\u00e9":2},"gps":{"l\u0061t":3},"d\u0065vice_id":"d\"1"}"#,
        )
        .unwrap();
        assert_eq!(r.device_id, "d\"1");
        assert_eq!(r.metrics.keys().collect::<Vec<_>>(), ["aé", "gps.lat", "temp"]);
        let mut out = Vec::new();
        decode(br#"{"re\u0061dings":[{"seq":1}]}"#, &ctx(), &mut out).unwrap();
        assert_eq!(seqs(&out), [Some(1)]);
    }

    #[test]
    fn tags_and_timestamps_take_scalars() {
        let r =
            one(r#"{"tags":{"f":1.5,"n":-3,"b":false,"z":null,"u":18446744073709551615},"ts":-5}"#).unwrap();
        let tags: Vec<_> = r.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(tags, [("b", "false"), ("f", "1.5"), ("n", "-3"), ("u", "18446744073709551615")]);
        assert_eq!(r.device_ts_ms, Some(-5));
        assert_eq!(one(r#"{"ts":null,"metrics":null,"v":1}"#).unwrap().device_ts_ms, None);
        let cases = [
            (r#"{"ts":1.5}"#, "field `ts`: must be integer milliseconds since the Unix epoch"),
            (
                r#"{"ts":9223372036854775808}"#,
                "field `ts`: must be integer milliseconds since the Unix epoch",
            ),
            (r#"{"ts":true}"#, "field `ts`: must be milliseconds or an RFC 3339 string"),
            (r#"{"seq":1.0}"#, "field `seq`: must be a non-negative integer"),
            (r#"{"seq":null}"#, "field `seq`: must be a non-negative integer"),
            (r#"{"metrics":5}"#, "field `metrics`: must be an object of name → value"),
            (r#"{"tags":null}"#, "field `tags`: must be an object of name → string"),
        ];
        for (payload, want) in cases {
            assert_eq!(one(payload).unwrap_err().to_string(), want, "payload {payload}");
        }
    }

    #[test]
    fn nesting_stops_at_max_depth() {
        let nested = |depth: usize| format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
        let deepest = ["a"; MAX_DEPTH].join(".");
        assert_eq!(number(&one(&nested(MAX_DEPTH)).unwrap(), &deepest), 1.0);
        let err = one(&nested(MAX_DEPTH + 1)).unwrap_err();
        assert_eq!(err, PayloadError::InvalidField { field: deepest, reason: "nested too deeply" });
    }

    #[test]
    fn a_key_given_twice_is_applied_twice() {
        let r =
            one(r#"{"seq":1,"seq":2,"tags":{"a":"1"},"tags":{"b":"2"},"metrics":{"x":1},"metrics":{"y":2}}"#)
                .unwrap();
        assert_eq!(r.seq, Some(2));
        assert_eq!(r.tags.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(r.metrics.keys().collect::<Vec<_>>(), ["x", "y"]);
    }

    /// Found by the payload_json fuzz target's round trip: 11112222222222222296.12 decoded to
    /// the double 1.1112222222222221e19, but that double written in its shortest form, as a
    /// device's JSON library writes it, decoded one unit in the last place off: serde_json's
    /// default number parser is not correctly rounded. Metrics are now the correctly rounded
    /// value of what the device sent (serde_json's `float_roundtrip`).
    #[test]
    fn json_float_is_correctly_rounded() {
        let text = "11112222222222222296.12"; // the fuzzer's number
        let exact: f64 = text.parse().unwrap(); // the standard library rounds correctly
        let r = one(&format!(r#"{{"x":{text}}}"#)).unwrap();
        assert_eq!(number(&r, "x").to_bits(), exact.to_bits());
        let shortest = format!("{exact:?}");
        assert_eq!(shortest, "1.1112222222222221e19");
        let again = one(&format!(r#"{{"x":{shortest}}}"#)).unwrap();
        assert_eq!(number(&again, "x").to_bits(), exact.to_bits(), "was 1 ULP off");
    }
}
