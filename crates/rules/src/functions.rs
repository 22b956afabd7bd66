//! SQL functions riskstream adds to DataFusion for rules and row-level features.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array};
use arrow::datatypes::DataType;
use datafusion::common::{exec_err, Result};
use datafusion::logical_expr::{ColumnarValue, ScalarUDF, Signature, SimpleScalarUDF, Volatility};

/// Mean Earth radius in kilometres.
const EARTH_RADIUS_KM: f64 = 6371.0088;

/// Every function riskstream registers.
pub fn all() -> Vec<ScalarUDF> {
    vec![haversine_km()]
}

/// `haversine_km(lat1, lon1, lat2, lon2)`: great-circle distance in km; NULL if any input is.
pub fn haversine_km() -> ScalarUDF {
    ScalarUDF::from(SimpleScalarUDF::new_with_signature(
        "haversine_km",
        Signature::uniform(4, vec![DataType::Float64], Volatility::Immutable),
        DataType::Float64,
        Arc::new(haversine_impl),
    ))
}

fn haversine_impl(args: &[ColumnarValue]) -> Result<ColumnarValue> {
    let arrays = ColumnarValue::values_to_arrays(args)?;
    let [a, b, c, d] = arrays.as_slice() else {
        return exec_err!("haversine_km takes 4 arguments, got {}", arrays.len());
    };
    let cols = [a, b, c, d].map(|x| x.as_any().downcast_ref::<Float64Array>());
    let [Some(lat1), Some(lon1), Some(lat2), Some(lon2)] = cols else {
        return exec_err!("haversine_km arguments must be Float64");
    };
    let out: Float64Array = (0..lat1.len())
        .map(|i| {
            if lat1.is_null(i) || lon1.is_null(i) || lat2.is_null(i) || lon2.is_null(i) {
                None
            } else {
                Some(haversine(
                    lat1.value(i),
                    lon1.value(i),
                    lat2.value(i),
                    lon2.value(i),
                ))
            }
        })
        .collect();
    let out: ArrayRef = Arc::new(out);
    if args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_))) {
        return Ok(ColumnarValue::Scalar(
            datafusion::common::ScalarValue::try_from_array(&out, 0)?,
        ));
    }
    Ok(ColumnarValue::Array(out))
}

/// Great-circle distance between two points given in degrees, in km.
pub fn haversine(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let h = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haversine_matches_known_distances() {
        assert_eq!(haversine(10.0, 20.0, 10.0, 20.0), 0.0);
        // Paris – London, about 343.5 km.
        let d = haversine(48.8566, 2.3522, 51.5074, -0.1278);
        assert!((d - 343.5).abs() < 1.0, "{d}");
        // A quarter of the equator.
        let q = haversine(0.0, 0.0, 0.0, 90.0);
        assert!((q - EARTH_RADIUS_KM * std::f64::consts::FRAC_PI_2).abs() < 1e-9);
    }
}
