//! GTFS-realtime: a `FeedMessage` protobuf into a compact, stable JSON projection, and the
//! identity keys and ignored paths that suit it.
//!
//! The projection follows the proto (`transit_realtime`, bindings from the `gtfs-realtime`
//! crate):
//! - field names are the proto's (`stop_time_update`, `current_status`);
//! - enums are their names (`"IN_TRANSIT_TO"`); a number the bindings cannot name (a newer
//!   spec, an agency's own value) is kept as that number;
//! - unset optional fields and empty repeated fields are omitted; required fields are always
//!   written;
//! - 64-bit integers are JSON numbers when a double holds them exactly (up to 2^53 - 1 in
//!   magnitude, which covers every real timestamp), decimal strings beyond;
//! - `float` fields are written with the fewest digits that read back to the same `float`
//!   (`42.3567`, not `42.35670089721680`); non-finite values as `"NaN"`, `"Infinity"`,
//!   `"-Infinity"`.
//!
//! Unknown fields and extensions (agency additions) are dropped: they have no name to write.
//! Field order is the proto's declaration order, so equal feeds give byte-equal JSON.

use gtfs_realtime::{
    Alert, EntitySelector, FeedEntity, FeedHeader, FeedMessage, Position, ReplacementStop, Shape,
    Stop, StopSelector, TimeRange, TranslatedImage, TranslatedString, TripDescriptor,
    TripModifications, TripUpdate, VehicleDescriptor, VehiclePosition, alert, feed_header, stop,
    translated_image, translated_string, trip_descriptor, trip_modifications, trip_update,
    vehicle_descriptor, vehicle_position,
};
use prost::Message;
use serde_json::{Map, Value};

use super::DecodeError;

/// Identity keys used for a `gtfs-rt` stream unless its `[streams.diff] keys` sets the same
/// array: `(array pattern, key path relative to the element)`.
///
/// - `/entity` by `id`: the feed's own entity id. Producers that mint a new `entity.id` every
///   poll should key on the vehicle (`vehicle/vehicle/id`) or trip
///   (`trip_update/trip/trip_id`) instead.
/// - stop-time updates by `stop_sequence`, which the spec makes unique within a trip (`stop_id`
///   repeats on loop routes). Where a producer omits it, the array is diffed by position.
/// - informed entities by `stop_id`: a selector has no id of its own, and stop-level alerts
///   (elevators, closed entrances) list each stop once, so their changes are matched per stop.
///   Where a selector has no `stop_id` (a route, an agency) or a stop repeats (one per route),
///   that alert's list falls back to the edit-script diff, which matches unchanged selectors by
///   value. Either way the patch is exact; on the MBTA alerts sequence it is the same size.
/// - carriages by `id`; translations by `language` (unique per text, absent for the default
///   language in single-language feeds, where the list has one element anyway).
pub const DEFAULT_KEYS: [(&str, &str); 5] = [
    ("/entity", "id"),
    ("/entity/*/trip_update/stop_time_update", "stop_sequence"),
    ("/entity/*/alert/informed_entity", "stop_id"),
    ("/entity/*/vehicle/multi_carriage_details", "id"),
    ("/entity/*/alert/*/translation", "language"),
];

/// Paths ignored for a `gtfs-rt` stream unless its `[streams.diff] ignore` is set: a feed whose
/// only change is its header timestamp publishes nothing (the new timestamp rides along with
/// the next real change).
pub const DEFAULT_IGNORE: [&str; 1] = ["/header/timestamp"];

/// Decodes a `FeedMessage` and projects it to JSON.
///
/// Errors on an empty body, on bytes that are not a valid protobuf `FeedMessage` (including a
/// truncated one), and on a message without `header.gtfs_realtime_version`, which every feed
/// must carry: without that check an empty or foreign protobuf would publish an empty feed.
pub fn decode(body: &[u8]) -> Result<Value, DecodeError> {
    if body.is_empty() {
        return Err(DecodeError::GtfsRt {
            reason: "the body is empty".to_owned(),
        });
    }
    let feed = FeedMessage::decode(body).map_err(|e| DecodeError::GtfsRt {
        reason: format!("{e}{}", looks_like(body)),
    })?;
    if feed.header.gtfs_realtime_version.is_empty() {
        return Err(DecodeError::GtfsRt {
            reason: format!(
                "header.gtfs_realtime_version is missing (every FeedMessage carries it){}",
                looks_like(body)
            ),
        });
    }
    Ok(project(feed))
}

/// A hint when a body that is not GTFS-realtime looks like something else.
fn looks_like(body: &[u8]) -> &'static str {
    let start = body.iter().find(|b| !b.is_ascii_whitespace());
    match start {
        Some(b'{' | b'[') => "; the body looks like JSON: set format = \"json\" for this stream",
        Some(b'<') => "; the body looks like HTML or XML, not a protobuf feed",
        _ if body.starts_with(&[0x1f, 0x8b]) => {
            "; the body is gzip data sent without `Content-Encoding: gzip`"
        }
        _ => "",
    }
}

/// The JSON projection of `feed` (see the module documentation).
pub fn project(feed: FeedMessage) -> Value {
    let FeedMessage { header, entity } = feed;
    let mut out = Obj::default();
    out.put("header", feed_header(header));
    out.list("entity", entity, feed_entity);
    out.into()
}

/// An object under construction, in field order.
#[derive(Default)]
struct Obj(Map<String, Value>);

impl Obj {
    fn put(&mut self, key: &str, value: Value) {
        self.0.insert(key.to_owned(), value);
    }

    fn opt<T>(&mut self, key: &str, value: Option<T>, f: impl FnOnce(T) -> Value) {
        if let Some(v) = value {
            self.put(key, f(v));
        }
    }

    fn list<T>(&mut self, key: &str, items: Vec<T>, f: impl FnMut(T) -> Value) {
        if !items.is_empty() {
            self.put(key, Value::Array(items.into_iter().map(f).collect()));
        }
    }
}

impl From<Obj> for Value {
    fn from(obj: Obj) -> Value {
        Value::Object(obj.0)
    }
}

/// Largest integer magnitude a double represents exactly, with every smaller one.
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

fn uint64(v: u64) -> Value {
    if v <= MAX_SAFE_INTEGER {
        Value::from(v)
    } else {
        Value::String(v.to_string())
    }
}

fn int64(v: i64) -> Value {
    if v.unsigned_abs() <= MAX_SAFE_INTEGER {
        Value::from(v)
    } else {
        Value::String(v.to_string())
    }
}

fn non_finite(v: f64) -> Value {
    let name = if v.is_nan() {
        "NaN"
    } else if v > 0.0 {
        "Infinity"
    } else {
        "-Infinity"
    };
    Value::String(name.to_owned())
}

fn float(v: f32) -> Value {
    if !v.is_finite() {
        return non_finite(f64::from(v));
    }
    // `Display` writes the shortest decimal that reads back to the same f32; read as an f64 it
    // serializes with those same digits.
    let shortest: f64 = v.to_string().parse().unwrap_or(f64::from(v));
    serde_json::Number::from_f64(shortest).map_or_else(|| non_finite(shortest), Value::Number)
}

fn double(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or_else(|| non_finite(v), Value::Number)
}

fn string(v: String) -> Value {
    Value::String(v)
}

/// An enum by name, or by number when the bindings do not know it.
fn named<E: TryFrom<i32>>(v: i32, name: impl FnOnce(E) -> &'static str) -> Value {
    match E::try_from(v) {
        Ok(e) => Value::String(name(e).to_owned()),
        Err(_) => Value::from(v),
    }
}

fn feed_header(h: FeedHeader) -> Value {
    let FeedHeader {
        gtfs_realtime_version,
        incrementality,
        timestamp,
        feed_version,
    } = h;
    let mut out = Obj::default();
    out.put("gtfs_realtime_version", string(gtfs_realtime_version));
    out.opt("incrementality", incrementality, |v| {
        named(v, |e: feed_header::Incrementality| e.as_str_name())
    });
    out.opt("timestamp", timestamp, uint64);
    out.opt("feed_version", feed_version, string);
    out.into()
}

fn feed_entity(e: FeedEntity) -> Value {
    let FeedEntity {
        id,
        is_deleted,
        trip_update,
        vehicle,
        alert,
        shape,
        stop,
        trip_modifications,
    } = e;
    let mut out = Obj::default();
    out.put("id", string(id));
    out.opt("is_deleted", is_deleted, Value::Bool);
    out.opt("trip_update", trip_update, self::trip_update);
    out.opt("vehicle", vehicle, vehicle_position);
    out.opt("alert", alert, self::alert);
    out.opt("shape", shape, self::shape);
    out.opt("stop", stop, self::stop);
    out.opt(
        "trip_modifications",
        trip_modifications,
        self::trip_modifications,
    );
    out.into()
}

fn trip_update(t: TripUpdate) -> Value {
    let TripUpdate {
        trip,
        vehicle,
        stop_time_update,
        timestamp,
        delay,
        trip_properties,
    } = t;
    let mut out = Obj::default();
    out.put("trip", trip_descriptor(trip));
    out.opt("vehicle", vehicle, vehicle_descriptor);
    out.list("stop_time_update", stop_time_update, self::stop_time_update);
    out.opt("timestamp", timestamp, uint64);
    out.opt("delay", delay, Value::from);
    out.opt("trip_properties", trip_properties, self::trip_properties);
    out.into()
}

fn stop_time_event(e: trip_update::StopTimeEvent) -> Value {
    let trip_update::StopTimeEvent {
        delay,
        time,
        uncertainty,
        scheduled_time,
    } = e;
    let mut out = Obj::default();
    out.opt("delay", delay, Value::from);
    out.opt("time", time, int64);
    out.opt("uncertainty", uncertainty, Value::from);
    out.opt("scheduled_time", scheduled_time, int64);
    out.into()
}

fn stop_time_update(u: trip_update::StopTimeUpdate) -> Value {
    use trip_update::stop_time_update::ScheduleRelationship;
    let trip_update::StopTimeUpdate {
        stop_sequence,
        stop_id,
        arrival,
        departure,
        departure_occupancy_status,
        schedule_relationship,
        stop_time_properties,
    } = u;
    let mut out = Obj::default();
    out.opt("stop_sequence", stop_sequence, Value::from);
    out.opt("stop_id", stop_id, string);
    out.opt("arrival", arrival, stop_time_event);
    out.opt("departure", departure, stop_time_event);
    out.opt(
        "departure_occupancy_status",
        departure_occupancy_status,
        |v| named(v, |e: vehicle_position::OccupancyStatus| e.as_str_name()),
    );
    out.opt("schedule_relationship", schedule_relationship, |v| {
        named(v, |e: ScheduleRelationship| e.as_str_name())
    });
    out.opt(
        "stop_time_properties",
        stop_time_properties,
        self::stop_time_properties,
    );
    out.into()
}

fn stop_time_properties(p: trip_update::stop_time_update::StopTimeProperties) -> Value {
    use trip_update::stop_time_update::StopTimeProperties;
    use trip_update::stop_time_update::stop_time_properties::DropOffPickupType;
    let StopTimeProperties {
        assigned_stop_id,
        stop_headsign,
        pickup_type,
        drop_off_type,
    } = p;
    let mut out = Obj::default();
    out.opt("assigned_stop_id", assigned_stop_id, string);
    out.opt("stop_headsign", stop_headsign, string);
    out.opt("pickup_type", pickup_type, |v| {
        named(v, |e: DropOffPickupType| e.as_str_name())
    });
    out.opt("drop_off_type", drop_off_type, |v| {
        named(v, |e: DropOffPickupType| e.as_str_name())
    });
    out.into()
}

fn trip_properties(p: trip_update::TripProperties) -> Value {
    let trip_update::TripProperties {
        trip_id,
        start_date,
        start_time,
        shape_id,
        trip_headsign,
        trip_short_name,
    } = p;
    let mut out = Obj::default();
    out.opt("trip_id", trip_id, string);
    out.opt("start_date", start_date, string);
    out.opt("start_time", start_time, string);
    out.opt("shape_id", shape_id, string);
    out.opt("trip_headsign", trip_headsign, string);
    out.opt("trip_short_name", trip_short_name, string);
    out.into()
}

fn vehicle_position(v: VehiclePosition) -> Value {
    use vehicle_position::{CongestionLevel, OccupancyStatus, VehicleStopStatus};
    let VehiclePosition {
        trip,
        vehicle,
        position,
        current_stop_sequence,
        stop_id,
        current_status,
        timestamp,
        congestion_level,
        occupancy_status,
        occupancy_percentage,
        multi_carriage_details,
    } = v;
    let mut out = Obj::default();
    out.opt("trip", trip, trip_descriptor);
    out.opt("vehicle", vehicle, vehicle_descriptor);
    out.opt("position", position, self::position);
    out.opt("current_stop_sequence", current_stop_sequence, Value::from);
    out.opt("stop_id", stop_id, string);
    out.opt("current_status", current_status, |v| {
        named(v, |e: VehicleStopStatus| e.as_str_name())
    });
    out.opt("timestamp", timestamp, uint64);
    out.opt("congestion_level", congestion_level, |v| {
        named(v, |e: CongestionLevel| e.as_str_name())
    });
    out.opt("occupancy_status", occupancy_status, |v| {
        named(v, |e: OccupancyStatus| e.as_str_name())
    });
    out.opt("occupancy_percentage", occupancy_percentage, Value::from);
    out.list(
        "multi_carriage_details",
        multi_carriage_details,
        carriage_details,
    );
    out.into()
}

fn carriage_details(c: vehicle_position::CarriageDetails) -> Value {
    let vehicle_position::CarriageDetails {
        id,
        label,
        occupancy_status,
        occupancy_percentage,
        carriage_sequence,
    } = c;
    let mut out = Obj::default();
    out.opt("id", id, string);
    out.opt("label", label, string);
    out.opt("occupancy_status", occupancy_status, |v| {
        named(v, |e: vehicle_position::OccupancyStatus| e.as_str_name())
    });
    out.opt("occupancy_percentage", occupancy_percentage, Value::from);
    out.opt("carriage_sequence", carriage_sequence, Value::from);
    out.into()
}

fn alert(a: Alert) -> Value {
    let Alert {
        active_period,
        informed_entity,
        cause,
        effect,
        url,
        header_text,
        description_text,
        tts_header_text,
        tts_description_text,
        severity_level,
        image,
        image_alternative_text,
        cause_detail,
        effect_detail,
    } = a;
    let mut out = Obj::default();
    out.list("active_period", active_period, time_range);
    out.list("informed_entity", informed_entity, entity_selector);
    out.opt("cause", cause, |v| {
        named(v, |e: alert::Cause| e.as_str_name())
    });
    out.opt("effect", effect, |v| {
        named(v, |e: alert::Effect| e.as_str_name())
    });
    out.opt("url", url, translated_string);
    out.opt("header_text", header_text, translated_string);
    out.opt("description_text", description_text, translated_string);
    out.opt("tts_header_text", tts_header_text, translated_string);
    out.opt(
        "tts_description_text",
        tts_description_text,
        translated_string,
    );
    out.opt("severity_level", severity_level, |v| {
        named(v, |e: alert::SeverityLevel| e.as_str_name())
    });
    out.opt("image", image, translated_image);
    out.opt(
        "image_alternative_text",
        image_alternative_text,
        translated_string,
    );
    out.opt("cause_detail", cause_detail, translated_string);
    out.opt("effect_detail", effect_detail, translated_string);
    out.into()
}

fn time_range(r: TimeRange) -> Value {
    let TimeRange { start, end } = r;
    let mut out = Obj::default();
    out.opt("start", start, uint64);
    out.opt("end", end, uint64);
    out.into()
}

fn position(p: Position) -> Value {
    let Position {
        latitude,
        longitude,
        bearing,
        odometer,
        speed,
    } = p;
    let mut out = Obj::default();
    out.put("latitude", float(latitude));
    out.put("longitude", float(longitude));
    out.opt("bearing", bearing, float);
    out.opt("odometer", odometer, double);
    out.opt("speed", speed, float);
    out.into()
}

fn trip_descriptor(t: TripDescriptor) -> Value {
    let TripDescriptor {
        trip_id,
        route_id,
        direction_id,
        start_time,
        start_date,
        schedule_relationship,
        modified_trip,
    } = t;
    let mut out = Obj::default();
    out.opt("trip_id", trip_id, string);
    out.opt("route_id", route_id, string);
    out.opt("direction_id", direction_id, Value::from);
    out.opt("start_time", start_time, string);
    out.opt("start_date", start_date, string);
    out.opt("schedule_relationship", schedule_relationship, |v| {
        named(v, |e: trip_descriptor::ScheduleRelationship| {
            e.as_str_name()
        })
    });
    out.opt("modified_trip", modified_trip, modified_trip_selector);
    out.into()
}

fn modified_trip_selector(m: trip_descriptor::ModifiedTripSelector) -> Value {
    let trip_descriptor::ModifiedTripSelector {
        modifications_id,
        affected_trip_id,
        start_time,
        start_date,
    } = m;
    let mut out = Obj::default();
    out.opt("modifications_id", modifications_id, string);
    out.opt("affected_trip_id", affected_trip_id, string);
    out.opt("start_time", start_time, string);
    out.opt("start_date", start_date, string);
    out.into()
}

fn vehicle_descriptor(v: VehicleDescriptor) -> Value {
    let VehicleDescriptor {
        id,
        label,
        license_plate,
        wheelchair_accessible,
    } = v;
    let mut out = Obj::default();
    out.opt("id", id, string);
    out.opt("label", label, string);
    out.opt("license_plate", license_plate, string);
    out.opt("wheelchair_accessible", wheelchair_accessible, |v| {
        named(v, |e: vehicle_descriptor::WheelchairAccessible| {
            e.as_str_name()
        })
    });
    out.into()
}

fn entity_selector(s: EntitySelector) -> Value {
    let EntitySelector {
        agency_id,
        route_id,
        route_type,
        trip,
        stop_id,
        direction_id,
    } = s;
    let mut out = Obj::default();
    out.opt("agency_id", agency_id, string);
    out.opt("route_id", route_id, string);
    out.opt("route_type", route_type, Value::from);
    out.opt("trip", trip, trip_descriptor);
    out.opt("stop_id", stop_id, string);
    out.opt("direction_id", direction_id, Value::from);
    out.into()
}

fn translated_string(s: TranslatedString) -> Value {
    let TranslatedString { translation } = s;
    let mut out = Obj::default();
    out.list("translation", translation, |t| {
        let translated_string::Translation { text, language } = t;
        let mut out = Obj::default();
        out.put("text", string(text));
        out.opt("language", language, string);
        out.into()
    });
    out.into()
}

fn translated_image(i: TranslatedImage) -> Value {
    let TranslatedImage { localized_image } = i;
    let mut out = Obj::default();
    out.list("localized_image", localized_image, |l| {
        let translated_image::LocalizedImage {
            url,
            media_type,
            language,
        } = l;
        let mut out = Obj::default();
        out.put("url", string(url));
        out.put("media_type", string(media_type));
        out.opt("language", language, string);
        out.into()
    });
    out.into()
}

fn shape(s: Shape) -> Value {
    let Shape {
        shape_id,
        encoded_polyline,
    } = s;
    let mut out = Obj::default();
    out.opt("shape_id", shape_id, string);
    out.opt("encoded_polyline", encoded_polyline, string);
    out.into()
}

fn stop(s: Stop) -> Value {
    let Stop {
        stop_id,
        stop_code,
        stop_name,
        tts_stop_name,
        stop_desc,
        stop_lat,
        stop_lon,
        zone_id,
        stop_url,
        parent_station,
        stop_timezone,
        wheelchair_boarding,
        level_id,
        platform_code,
    } = s;
    let mut out = Obj::default();
    out.opt("stop_id", stop_id, string);
    out.opt("stop_code", stop_code, translated_string);
    out.opt("stop_name", stop_name, translated_string);
    out.opt("tts_stop_name", tts_stop_name, translated_string);
    out.opt("stop_desc", stop_desc, translated_string);
    out.opt("stop_lat", stop_lat, float);
    out.opt("stop_lon", stop_lon, float);
    out.opt("zone_id", zone_id, string);
    out.opt("stop_url", stop_url, translated_string);
    out.opt("parent_station", parent_station, string);
    out.opt("stop_timezone", stop_timezone, string);
    out.opt("wheelchair_boarding", wheelchair_boarding, |v| {
        named(v, |e: stop::WheelchairBoarding| e.as_str_name())
    });
    out.opt("level_id", level_id, string);
    out.opt("platform_code", platform_code, translated_string);
    out.into()
}

fn trip_modifications(t: TripModifications) -> Value {
    let TripModifications {
        selected_trips,
        start_times,
        service_dates,
        modifications,
    } = t;
    let mut out = Obj::default();
    out.list("selected_trips", selected_trips, |s| {
        let trip_modifications::SelectedTrips { trip_ids, shape_id } = s;
        let mut out = Obj::default();
        out.list("trip_ids", trip_ids, string);
        out.opt("shape_id", shape_id, string);
        out.into()
    });
    out.list("start_times", start_times, string);
    out.list("service_dates", service_dates, string);
    out.list("modifications", modifications, modification);
    out.into()
}

fn modification(m: trip_modifications::Modification) -> Value {
    let trip_modifications::Modification {
        start_stop_selector,
        end_stop_selector,
        propagated_modification_delay,
        replacement_stops,
        service_alert_id,
        last_modified_time,
    } = m;
    let mut out = Obj::default();
    out.opt("start_stop_selector", start_stop_selector, stop_selector);
    out.opt("end_stop_selector", end_stop_selector, stop_selector);
    out.opt(
        "propagated_modification_delay",
        propagated_modification_delay,
        Value::from,
    );
    out.list("replacement_stops", replacement_stops, replacement_stop);
    out.opt("service_alert_id", service_alert_id, string);
    out.opt("last_modified_time", last_modified_time, uint64);
    out.into()
}

fn stop_selector(s: StopSelector) -> Value {
    let StopSelector {
        stop_sequence,
        stop_id,
    } = s;
    let mut out = Obj::default();
    out.opt("stop_sequence", stop_sequence, Value::from);
    out.opt("stop_id", stop_id, string);
    out.into()
}

fn replacement_stop(r: ReplacementStop) -> Value {
    let ReplacementStop {
        travel_time_to_stop,
        stop_id,
    } = r;
    let mut out = Obj::default();
    out.opt("travel_time_to_stop", travel_time_to_stop, Value::from);
    out.opt("stop_id", stop_id, string);
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn header(timestamp: u64) -> FeedHeader {
        FeedHeader {
            gtfs_realtime_version: "2.0".into(),
            incrementality: Some(feed_header::Incrementality::FullDataset as i32),
            timestamp: Some(timestamp),
            feed_version: None,
        }
    }

    fn vehicle_entity(id: &str) -> FeedEntity {
        FeedEntity {
            id: id.into(),
            vehicle: Some(VehiclePosition {
                trip: Some(TripDescriptor {
                    trip_id: Some("t1".into()),
                    route_id: Some("Red".into()),
                    direction_id: Some(1),
                    schedule_relationship: Some(
                        trip_descriptor::ScheduleRelationship::Scheduled as i32,
                    ),
                    ..Default::default()
                }),
                vehicle: Some(VehicleDescriptor {
                    id: Some("R-5463".into()),
                    label: Some("1812".into()),
                    ..Default::default()
                }),
                position: Some(Position {
                    latitude: 42.3567,
                    longitude: -71.0622,
                    bearing: Some(135.0),
                    odometer: None,
                    speed: Some(f32::NAN),
                }),
                current_status: Some(vehicle_position::VehicleStopStatus::StoppedAt as i32),
                // A value this version of the spec does not name.
                occupancy_status: Some(42),
                timestamp: Some(1_683_547_200),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn feed() -> FeedMessage {
        FeedMessage {
            header: header(1_683_547_201),
            entity: vec![vehicle_entity("v1")],
        }
    }

    #[test]
    fn projection_uses_proto_names_enum_names_and_omits_unset_fields() {
        let got = decode(&feed().encode_to_vec()).unwrap();
        let expected = json!({
            "header": {
                "gtfs_realtime_version": "2.0",
                "incrementality": "FULL_DATASET",
                "timestamp": 1_683_547_201u64,
            },
            "entity": [{
                "id": "v1",
                "vehicle": {
                    "trip": {
                        "trip_id": "t1",
                        "route_id": "Red",
                        "direction_id": 1,
                        "schedule_relationship": "SCHEDULED",
                    },
                    "vehicle": {"id": "R-5463", "label": "1812"},
                    "position": {
                        "latitude": 42.3567,
                        "longitude": -71.0622,
                        "bearing": 135.0,
                        "speed": "NaN",
                    },
                    "current_status": "STOPPED_AT",
                    "timestamp": 1_683_547_200u64,
                    "occupancy_status": 42,
                },
            }],
        });
        assert_eq!(got, expected);
        // Floats are written with the digits of the f32, not of its f64 widening.
        let text = serde_json::to_string(&got).unwrap();
        assert!(text.contains("\"latitude\":42.3567,"), "{text}");
        // Declaration order, so equal feeds serialize to equal bytes.
        assert!(
            text.starts_with("{\"header\":{\"gtfs_realtime_version\""),
            "{text}"
        );
    }

    #[test]
    fn sixty_four_bit_values_are_numbers_while_a_double_holds_them() {
        assert_eq!(uint64(MAX_SAFE_INTEGER), json!(9_007_199_254_740_991u64));
        assert_eq!(uint64(MAX_SAFE_INTEGER + 1), json!("9007199254740992"));
        assert_eq!(uint64(u64::MAX), json!("18446744073709551615"));
        assert_eq!(int64(-1_683_547_200), json!(-1_683_547_200i64));
        assert_eq!(
            int64(-(MAX_SAFE_INTEGER as i64) - 1),
            json!("-9007199254740992")
        );
        assert_eq!(int64(i64::MIN), json!("-9223372036854775808"));
    }

    #[test]
    fn floats_round_trip_and_non_finite_values_are_named() {
        for v in [0.1f32, 42.3567, -71.0622, 1e-7, f32::MAX, f32::MIN_POSITIVE] {
            let json = float(v);
            let back = json.as_f64().unwrap() as f32;
            assert_eq!(back.to_bits(), v.to_bits(), "{v} -> {json}");
        }
        assert_eq!(float(f32::INFINITY), json!("Infinity"));
        assert_eq!(float(f32::NEG_INFINITY), json!("-Infinity"));
        assert_eq!(double(f64::NAN), json!("NaN"));
        assert_eq!(double(12345.5), json!(12345.5));
    }

    /// Appends an unknown field (number 1000, the start of the extension range, and 9000, an
    /// agency's private number) to a message's bytes.
    fn with_unknown_fields(mut bytes: Vec<u8>) -> Vec<u8> {
        // Field 1000, varint: key = 1000 << 3 | 0.
        prost::encoding::encode_varint(1000 << 3, &mut bytes);
        prost::encoding::encode_varint(7, &mut bytes);
        // Field 9000, length-delimited: key = 9000 << 3 | 2.
        prost::encoding::encode_varint((9000 << 3) | 2, &mut bytes);
        prost::encoding::encode_varint(3, &mut bytes);
        bytes.extend_from_slice(b"ext");
        bytes
    }

    #[test]
    fn extensions_and_unknown_fields_are_dropped_not_fatal() {
        let mut entity = vehicle_entity("v1");
        // An extension inside a nested message: re-encode the vehicle with extra bytes.
        let vehicle = entity.vehicle.take().unwrap();
        let vehicle_bytes = with_unknown_fields(vehicle.encode_to_vec());
        let mut entity_bytes = entity.encode_to_vec();
        prost::encoding::encode_varint((4 << 3) | 2, &mut entity_bytes);
        prost::encoding::encode_varint(vehicle_bytes.len() as u64, &mut entity_bytes);
        entity_bytes.extend_from_slice(&vehicle_bytes);
        let entity_bytes = with_unknown_fields(entity_bytes);
        let mut body = header(1_683_547_201).encode_to_vec();
        let mut framed = Vec::new();
        prost::encoding::encode_varint((1 << 3) | 2, &mut framed);
        prost::encoding::encode_varint(body.len() as u64, &mut framed);
        framed.append(&mut body);
        prost::encoding::encode_varint((2 << 3) | 2, &mut framed);
        prost::encoding::encode_varint(entity_bytes.len() as u64, &mut framed);
        framed.extend_from_slice(&entity_bytes);
        let framed = with_unknown_fields(framed);

        let got = decode(&framed).unwrap();
        let plain = decode(&feed().encode_to_vec()).unwrap();
        assert_eq!(got, plain);
    }

    #[test]
    fn invalid_truncated_empty_and_foreign_bodies_are_errors() {
        let bytes = feed().encode_to_vec();
        let err = decode(&bytes[..bytes.len() - 1]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid GTFS-realtime feed (expected a protobuf FeedMessage): "),
            "{err}"
        );
        let err = decode(b"").unwrap_err();
        assert!(err.to_string().contains("the body is empty"), "{err}");
        let err = decode(b"not valid pb data").unwrap_err();
        assert!(err.to_string().contains("failed to decode"), "{err}");
        let err = decode(br#"{"header": {}}"#).unwrap_err();
        assert!(err.to_string().contains("set format = \"json\""), "{err}");
        let err = decode(b"<html><body>502 Bad Gateway</body></html>").unwrap_err();
        assert!(err.to_string().contains("HTML"), "{err}");
        // Valid protobuf, but no header version: not a feed.
        let other = FeedMessage {
            header: FeedHeader::default(),
            entity: vec![vehicle_entity("v1")],
        }
        .encode_to_vec();
        let err = decode(&other).unwrap_err();
        assert!(
            err.to_string().contains("gtfs_realtime_version is missing"),
            "{err}"
        );
    }

    #[test]
    fn every_message_kind_is_projected() {
        use trip_update::stop_time_update::StopTimeProperties;
        let translated = |text: &str| TranslatedString {
            translation: vec![translated_string::Translation {
                text: text.into(),
                language: Some("en".into()),
            }],
        };
        let feed = FeedMessage {
            header: header(1),
            entity: vec![
                FeedEntity {
                    id: "tu".into(),
                    is_deleted: Some(false),
                    trip_update: Some(TripUpdate {
                        trip: TripDescriptor {
                            trip_id: Some("t".into()),
                            ..Default::default()
                        },
                        stop_time_update: vec![trip_update::StopTimeUpdate {
                            stop_sequence: Some(3),
                            arrival: Some(trip_update::StopTimeEvent {
                                delay: Some(-30),
                                time: Some(1_700_000_000),
                                ..Default::default()
                            }),
                            schedule_relationship: Some(
                                trip_update::stop_time_update::ScheduleRelationship::Skipped as i32,
                            ),
                            stop_time_properties: Some(StopTimeProperties {
                                assigned_stop_id: Some("s2".into()),
                                drop_off_type: Some(1),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }],
                        trip_properties: Some(trip_update::TripProperties {
                            trip_headsign: Some("Alewife".into()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                FeedEntity {
                    id: "al".into(),
                    alert: Some(Alert {
                        active_period: vec![TimeRange {
                            start: Some(10),
                            end: None,
                        }],
                        informed_entity: vec![EntitySelector {
                            route_id: Some("Red".into()),
                            route_type: Some(1),
                            ..Default::default()
                        }],
                        cause: Some(alert::Cause::Maintenance as i32),
                        effect: Some(13),
                        header_text: Some(translated("Shuttle buses")),
                        severity_level: Some(alert::SeverityLevel::Severe as i32),
                        image: Some(TranslatedImage {
                            localized_image: vec![translated_image::LocalizedImage {
                                url: "https://x.example/a.png".into(),
                                media_type: "image/png".into(),
                                language: None,
                            }],
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                FeedEntity {
                    id: "st".into(),
                    stop: Some(Stop {
                        stop_id: Some("s9".into()),
                        stop_name: Some(translated("Park Street")),
                        stop_lat: Some(42.5),
                        wheelchair_boarding: Some(stop::WheelchairBoarding::Available as i32),
                        ..Default::default()
                    }),
                    shape: Some(Shape {
                        shape_id: Some("sh".into()),
                        encoded_polyline: Some("_p~iF~ps|U".into()),
                    }),
                    trip_modifications: Some(TripModifications {
                        selected_trips: vec![trip_modifications::SelectedTrips {
                            trip_ids: vec!["a".into(), "b".into()],
                            shape_id: None,
                        }],
                        service_dates: vec!["20260101".into()],
                        modifications: vec![trip_modifications::Modification {
                            start_stop_selector: Some(StopSelector {
                                stop_sequence: Some(1),
                                stop_id: None,
                            }),
                            replacement_stops: vec![ReplacementStop {
                                travel_time_to_stop: Some(60),
                                stop_id: Some("r".into()),
                            }],
                            last_modified_time: Some(5),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
        };
        let got = decode(&feed.encode_to_vec()).unwrap();
        assert_eq!(
            got["entity"][0],
            json!({"id": "tu", "is_deleted": false, "trip_update": {
                "trip": {"trip_id": "t"},
                "stop_time_update": [{
                    "stop_sequence": 3,
                    "arrival": {"delay": -30, "time": 1_700_000_000},
                    "schedule_relationship": "SKIPPED",
                    "stop_time_properties": {"assigned_stop_id": "s2", "drop_off_type": "NONE"},
                }],
                "trip_properties": {"trip_headsign": "Alewife"},
            }})
        );
        let alert = &got["entity"][1]["alert"];
        assert_eq!(alert["active_period"], json!([{"start": 10}]));
        assert_eq!(
            alert["informed_entity"],
            json!([{"route_id": "Red", "route_type": 1}])
        );
        assert_eq!(alert["cause"], "MAINTENANCE");
        assert_eq!(alert["severity_level"], "SEVERE");
        assert_eq!(
            alert["header_text"],
            json!({"translation": [{"text": "Shuttle buses", "language": "en"}]})
        );
        assert_eq!(
            alert["image"]["localized_image"][0],
            json!({"url": "https://x.example/a.png", "media_type": "image/png"})
        );
        // 13 (SPECIAL_EVENT) is newer than these bindings: named if known, else kept.
        assert!(
            alert["effect"] == json!(13) || alert["effect"] == json!("SPECIAL_EVENT"),
            "{}",
            alert["effect"]
        );
        let third = &got["entity"][2];
        assert_eq!(third["stop"]["stop_lat"], json!(42.5));
        assert_eq!(third["stop"]["wheelchair_boarding"], "AVAILABLE");
        assert_eq!(
            third["shape"],
            json!({"shape_id": "sh", "encoded_polyline": "_p~iF~ps|U"})
        );
        assert_eq!(
            third["trip_modifications"],
            json!({
                "selected_trips": [{"trip_ids": ["a", "b"]}],
                "service_dates": ["20260101"],
                "modifications": [{
                    "start_stop_selector": {"stop_sequence": 1},
                    "replacement_stops": [{"travel_time_to_stop": 60, "stop_id": "r"}],
                    "last_modified_time": 5,
                }],
            })
        );
    }

    #[test]
    fn default_keys_and_ignore_are_valid_patterns() {
        let table = crate::diff::DiffConfig {
            keys: Some(
                DEFAULT_KEYS
                    .iter()
                    .map(|(a, k)| ((*a).to_owned(), (*k).to_owned()))
                    .collect(),
            ),
            ignore: Some(DEFAULT_IGNORE.map(str::to_owned).to_vec()),
            ..Default::default()
        };
        let mut problems = crate::config::Problems::default();
        let options = table.validate("diff", &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let options = options.unwrap();
        assert_eq!(options.keys.len(), DEFAULT_KEYS.len());
        assert_eq!(options.ignore.len(), 1);
    }

    proptest! {
        /// Any prefix of a real-shaped feed decodes or fails cleanly; a prefix that decodes
        /// never has more entities than the whole feed.
        #[test]
        fn truncated_feeds_never_panic(cut in 0usize..400, entities in 1usize..4) {
            let feed = FeedMessage {
                header: header(7),
                entity: (0..entities).map(|i| vehicle_entity(&format!("v{i}"))).collect(),
            };
            let bytes = feed.encode_to_vec();
            let cut = cut.min(bytes.len());
            match decode(&bytes[..cut]) {
                Ok(v) => {
                    let n = v.get("entity").and_then(Value::as_array).map_or(0, Vec::len);
                    prop_assert!(n <= entities);
                }
                Err(DecodeError::GtfsRt { reason }) => prop_assert!(!reason.is_empty()),
                Err(other) => prop_assert!(false, "unexpected error kind: {other}"),
            }
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }
    }
}
