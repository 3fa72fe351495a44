//! ISO-8601 text for Debezium's integer-encoded dates and timestamps.
//!
//! Values count from the Unix epoch in UTC and may be negative (before 1970).
//! Any `i64` is accepted: Postgres's `infinity` arrives as an extreme integer,
//! and refusing it would dead-letter a real row.

/// The tick length of an integer timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimeUnit {
    Millis,
    Micros,
    Nanos,
}

impl TimeUnit {
    fn per_second(self) -> i64 {
        match self {
            TimeUnit::Millis => 1_000,
            TimeUnit::Micros => 1_000_000,
            TimeUnit::Nanos => 1_000_000_000,
        }
    }

    fn fraction_digits(self) -> usize {
        match self {
            TimeUnit::Millis => 3,
            TimeUnit::Micros => 6,
            TimeUnit::Nanos => 9,
        }
    }
}

const SECONDS_PER_DAY: i64 = 86_400;

/// `YYYY-MM-DD` for a count of days since 1970-01-01.
pub(crate) fn date_text(days_since_epoch: i64) -> String {
    let (year, month, day) = civil_from_days(days_since_epoch);
    format!("{}-{month:02}-{day:02}", iso_year(year))
}

/// `YYYY-MM-DDTHH:MM:SS.fff…` for a count of `unit` ticks since the epoch,
/// with as many fraction digits as the unit has.
pub(crate) fn timestamp_text(ticks: i64, unit: TimeUnit) -> String {
    // Euclidean division rounds toward minus infinity, which is what makes
    // pre-1970 values land on the right day with a non-negative time of day.
    let seconds = ticks.div_euclid(unit.per_second());
    let fraction = ticks.rem_euclid(unit.per_second());
    let days = seconds.div_euclid(SECONDS_PER_DAY);
    let second_of_day = seconds.rem_euclid(SECONDS_PER_DAY);
    format!(
        "{}T{:02}:{:02}:{:02}.{fraction:0width$}",
        date_text(days),
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60,
        width = unit.fraction_digits(),
    )
}

/// Proleptic Gregorian (year, month, day) for days since 1970-01-01.
///
/// Howard Hinnant's `civil_from_days`, computed in `i128` so that every `i64`
/// input is safe from overflow.
fn civil_from_days(days_since_epoch: i64) -> (i128, u32, u32) {
    // Shift the epoch to 0000-03-01 so leap days fall at the end of a year.
    let shifted = i128::from(days_since_epoch) + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097); // [0, 146096]
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365; // [0, 399]
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100); // [0, 365]
    let shifted_month = (5 * day_of_year + 2) / 153; // [0, 11], March = 0
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i128::from(month <= 2);
    // Both fit: month is in [1, 12], day in [1, 31].
    (year, month as u32, day as u32)
}

/// ISO-8601 year: four digits for 0000–9999, otherwise signed (astronomical
/// numbering, so 1 BC is `0000` and 2 BC is `-0001`).
fn iso_year(year: i128) -> String {
    match year {
        0..=9999 => format!("{year:04}"),
        negative if negative < 0 => format!("-{:04}", negative.unsigned_abs()),
        large => format!("+{large}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn event_temporal_dates() {
        assert_eq!(date_text(0), "1970-01-01");
        assert_eq!(date_text(-1), "1969-12-31");
        assert_eq!(date_text(-5_171), "1955-11-05");
        assert_eq!(date_text(11_016), "2000-02-29");
        assert_eq!(date_text(19_782), "2024-02-29");
        assert_eq!(date_text(-25_509), "1900-02-28");
        assert_eq!(date_text(-25_508), "1900-03-01");
        assert_eq!(date_text(-135_081), "1600-02-29");
        assert_eq!(date_text(-719_162), "0001-01-01");
        assert_eq!(date_text(-719_163), "0000-12-31");
        assert_eq!(date_text(-719_529), "-0001-12-31");
        assert_eq!(date_text(2_932_896), "9999-12-31");
        assert_eq!(date_text(2_932_897), "+10000-01-01");
    }

    #[test]
    fn event_temporal_timestamps() {
        assert_eq!(
            timestamp_text(1_709_214_330_123, TimeUnit::Millis),
            "2024-02-29T13:45:30.123"
        );
        assert_eq!(
            timestamp_text(0, TimeUnit::Millis),
            "1970-01-01T00:00:00.000"
        );
        assert_eq!(
            timestamp_text(-1, TimeUnit::Millis),
            "1969-12-31T23:59:59.999"
        );
        assert_eq!(
            timestamp_text(-299_631_476_543_211, TimeUnit::Micros),
            "1960-07-04T01:02:03.456789"
        );
        assert_eq!(
            timestamp_text(-2_203_891_199_999_999, TimeUnit::Micros),
            "1900-03-01T00:00:00.000001"
        );
        assert_eq!(
            timestamp_text(1_709_214_330_123_000_007, TimeUnit::Nanos),
            "2024-02-29T13:45:30.123000007"
        );
        assert_eq!(
            timestamp_text(-1, TimeUnit::Nanos),
            "1969-12-31T23:59:59.999999999"
        );
    }

    #[test]
    fn event_temporal_extremes_do_not_overflow() {
        for value in [i64::MIN, i64::MAX] {
            date_text(value);
            timestamp_text(value, TimeUnit::Millis);
            timestamp_text(value, TimeUnit::Micros);
            timestamp_text(value, TimeUnit::Nanos);
        }
        assert_eq!(
            timestamp_text(i64::MAX, TimeUnit::Nanos),
            "2262-04-11T23:47:16.854775807"
        );
        assert_eq!(
            timestamp_text(i64::MIN, TimeUnit::Nanos),
            "1677-09-21T00:12:43.145224192"
        );
    }

    fn days_in_month(year: i128, month: u32) -> u32 {
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        match month {
            2 if leap => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        }
    }

    proptest! {
        /// Consecutive days differ by exactly one calendar step, which pins
        /// the whole calendar once one anchor (1970-01-01) is right.
        #[test]
        fn event_temporal_next_day_is_one_calendar_step(days in -1_000_000_000i64..1_000_000_000) {
            let (year, month, day) = civil_from_days(days);
            let next = civil_from_days(days + 1);
            let expected = if day < days_in_month(year, month) {
                (year, month, day + 1)
            } else if month < 12 {
                (year, month + 1, 1)
            } else {
                (year + 1, 1, 1)
            };
            prop_assert_eq!(next, expected);
        }
    }
}
