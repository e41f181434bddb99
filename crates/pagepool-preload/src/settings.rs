//! The drop-in's settings, read once from `environ` (the process's environment as the C
//! runtime keeps it: no `std::env`, which could run before the standard library is set up).

use std::ffi::{CStr, c_char};

use pagepool::alloc::{DEFAULT_LARGEST, DEFAULT_POOL_LIMIT, DEFAULT_THRESHOLD};
use pagepool::parse_size;

unsafe extern "C" {
    static environ: *const *const c_char;
}

/// What the environment asked for (defaults where it said nothing, or nothing valid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Settings {
    pub(crate) threshold: usize,
    pub(crate) largest: usize,
    pub(crate) limit: usize,
    pub(crate) stats: bool,
    pub(crate) worker: bool,
    pub(crate) pressure: bool,
    pub(crate) disable: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            threshold: DEFAULT_THRESHOLD,
            largest: DEFAULT_LARGEST,
            limit: DEFAULT_POOL_LIMIT,
            stats: false,
            worker: true,
            pressure: true,
            disable: false,
        }
    }
}

/// A switch: `1`, `yes`, `on`, `true`, or `0`, `no`, `off`, `false`.
pub(crate) fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "yes" | "on" | "true" => Some(true),
        "0" | "no" | "off" | "false" => Some(false),
        _ => None,
    }
}

impl Settings {
    /// The settings from `environ`; `say` gets one line per bad value.
    pub(crate) fn from_environ(say: &mut dyn FnMut(&str)) -> Settings {
        let mut vars = Vec::new();
        // SAFETY: `environ` is the C runtime's NULL-terminated array of C strings; it is only
        // read here, in the constructor, before the program's code runs.
        unsafe {
            let mut p = environ;
            while !p.is_null() && !(*p).is_null() {
                if let Ok(kv) = CStr::from_ptr(*p).to_str()
                    && kv.starts_with("PAGEPOOL_")
                    && let Some((k, v)) = kv.split_once('=')
                {
                    vars.push((k.to_string(), v.to_string()));
                }
                p = p.add(1);
            }
        }
        Settings::from_vars(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())), say)
    }

    /// The settings from `(name, value)` pairs; `say` gets one line per bad value.
    pub(crate) fn from_vars<'a>(
        vars: impl Iterator<Item = (&'a str, &'a str)>,
        say: &mut dyn FnMut(&str),
    ) -> Settings {
        let mut s = Settings::default();
        let d = Settings::default();
        for (k, v) in vars {
            let mut size = |field: &mut usize, default: usize| match parse_size(v) {
                Some(n) if n > 0 => *field = n,
                _ => say(&format!(
                    "pagepool: {k}={v} is not a size (like 64K, 8M or 2G): using the default \
                     {default}\n"
                )),
            };
            match k {
                "PAGEPOOL_THRESHOLD" => size(&mut s.threshold, d.threshold),
                "PAGEPOOL_LARGEST" => size(&mut s.largest, d.largest),
                "PAGEPOOL_LIMIT" => match parse_size(v) {
                    Some(n) => s.limit = n,
                    None => say(&format!(
                        "pagepool: {k}={v} is not a size (like 64K, 8M or 2G): using the \
                         default {}\n",
                        d.limit
                    )),
                },
                "PAGEPOOL_STATS" | "PAGEPOOL_WORKER" | "PAGEPOOL_PRESSURE" | "PAGEPOOL_DISABLE" => {
                    let (field, default) = match k {
                        "PAGEPOOL_STATS" => (&mut s.stats, d.stats),
                        "PAGEPOOL_WORKER" => (&mut s.worker, d.worker),
                        "PAGEPOOL_PRESSURE" => (&mut s.pressure, d.pressure),
                        _ => (&mut s.disable, d.disable),
                    };
                    match parse_bool(v) {
                        Some(b) => *field = b,
                        None => say(&format!(
                            "pagepool: {k}={v} is not 0 or 1: using the default {}\n",
                            u8::from(default)
                        )),
                    }
                }
                // `PAGEPOOL_PRELOAD` is `pagepool run`'s; anything else is not ours to judge.
                _ => {}
            }
        }
        if s.largest < s.threshold {
            say(&format!(
                "pagepool: PAGEPOOL_LARGEST ({}) is below PAGEPOOL_THRESHOLD ({}): the pools \
                 serve one size class, the threshold's\n",
                s.largest, s.threshold
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_say_one_line_each_and_keep_the_default() {
        let mut lines = Vec::new();
        let s = Settings::from_vars(
            [
                ("PAGEPOOL_THRESHOLD", "lots"),
                ("PAGEPOOL_LIMIT", "1G"),
                ("PAGEPOOL_STATS", "maybe"),
                ("PAGEPOOL_WORKER", "0"),
                ("PAGEPOOL_LARGEST", "0"),
                ("PAGEPOOL_OTHER", "x"),
            ]
            .into_iter(),
            &mut |l| lines.push(l.to_string()),
        );
        assert_eq!(
            s,
            Settings {
                limit: 1 << 30,
                worker: false,
                ..Settings::default()
            }
        );
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].contains("PAGEPOOL_THRESHOLD=lots") && lines[0].ends_with('\n'));
        assert!(lines[1].contains("PAGEPOOL_STATS=maybe"));
        assert!(lines[2].contains("PAGEPOOL_LARGEST=0"));
    }
}
