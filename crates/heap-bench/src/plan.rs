//! What a run measures, decided from its arguments before anything is measured: the modes of
//! calls, each with the systems it runs at every size (its cells), the attrs mode's rows and the
//! random mode's buffers. Arguments a run cannot carry out are refused here, before any row runs.

use crate::{Args, measure, random, systems};

/// A mode of calls: `tight`, `paced`, `loaded` or `threads-T`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModePlan {
    /// The mode's name, as printed (`threads-2`).
    pub name: String,
    /// Threads mode: how many threads share each system.
    pub threads: Option<usize>,
    /// Work between calls (the paced and loaded modes).
    pub work: bool,
    /// One busy thread per core beside the calls, in a process of its own (the loaded mode).
    pub load: bool,
    /// The systems the mode runs, in table order: those of the run, but for the modes other
    /// than tight in a run without `--systems`, the general-purpose ones only (see
    /// [`systems::in_every_mode`]).
    pub systems: Vec<&'static str>,
}

impl ModePlan {
    fn new(name: &str, names: &[&'static str], all_systems: bool) -> ModePlan {
        let threads = name.strip_prefix("threads-").and_then(|t| t.parse().ok());
        let systems = names
            .iter()
            .copied()
            .filter(|n| !all_systems || name == "tight" || systems::in_every_mode(n))
            .collect();
        ModePlan {
            name: name.to_string(),
            threads,
            work: name == "paced" || name == "loaded",
            load: name == "loaded",
            systems,
        }
    }

    /// Whether the mode runs the system called `name`.
    pub fn runs(&self, name: &str) -> bool {
        self.systems.contains(&name)
    }

    /// The mode's cells, `(size, system)`, in the order they are measured: size by size, every
    /// system of a size in turn.
    pub fn cells<'a>(
        &'a self,
        sizes: &'a [usize],
    ) -> impl Iterator<Item = (usize, &'static str)> + 'a {
        sizes
            .iter()
            .flat_map(|&size| self.systems.iter().map(move |&s| (size, s)))
    }
}

/// Everything a run measures.
#[derive(Debug)]
pub struct Plan {
    /// Every mode the arguments name, in order, as printed in the run's first line.
    pub modes: Vec<String>,
    /// The modes of calls, in order.
    pub call_modes: Vec<ModePlan>,
    /// The systems of the modes of calls, in table order.
    pub names: Vec<&'static str>,
    /// The attrs mode's rows, in table order (empty: the mode does not run).
    pub attrs: Vec<&'static str>,
    /// The random mode's buffer lengths, smallest first (empty: the mode does not run).
    pub random: Vec<usize>,
    /// Whether the realloc mode runs (its rows are its own: `growth::ROWS`).
    pub realloc: bool,
    /// Whether the sparse mode runs (its rows are its own: `sparse::ROWS`).
    pub sparse: bool,
    /// Whether the programs mode runs (its rows are its own: `programs::PRELOADS`).
    pub programs: bool,
    /// The programs mode's repetitions (`--reps`, default 1).
    pub programs_reps: usize,
}

impl Plan {
    /// The plan of the run `args` ask for, or why it cannot run: a count of zero, an unknown
    /// system or one no mode runs, a thread count out of range, a size that cannot fit in this
    /// machine's available memory.
    pub fn new(args: &Args) -> Result<Plan, String> {
        if args.reps == Some(0) {
            return Err("--reps must be at least 1".into());
        }
        if args.iters == Some(0) {
            return Err("--iters must be at least 1".into());
        }
        let modes = expand_modes(args)?;
        let call_modes: Vec<&String> = modes
            .iter()
            .filter(|m| {
                !matches!(
                    m.as_str(),
                    "attrs" | "random" | "realloc" | "sparse" | "programs"
                )
            })
            .collect();
        let attrs = modes.iter().any(|m| m == "attrs");
        let random = modes.iter().any(|m| m == "random");
        let realloc = modes.iter().any(|m| m == "realloc");
        let sparse = modes.iter().any(|m| m == "sparse");
        let programs = modes.iter().any(|m| m == "programs");
        let known = |s: &str| {
            systems::ALL.contains(&s) || systems::EXTRA.contains(&s) || systems::ATTRS.contains(&s)
        };
        if let Some(s) = args.systems.iter().find(|s| !known(s)) {
            return Err(format!(
                "unknown system {s:?}; known: {}; run only when named: {}; attrs mode: {}",
                systems::ALL.join(", "),
                systems::EXTRA.join(", "),
                systems::ATTRS.join(", ")
            ));
        }
        let named = |n: &&str| args.systems.iter().any(|s| s == n);
        let names: Vec<&'static str> = if call_modes.is_empty() {
            Vec::new()
        } else if args.systems.is_empty() {
            systems::ALL.to_vec()
        } else {
            systems::ALL
                .iter()
                .chain(&systems::EXTRA)
                .copied()
                .filter(named)
                .collect()
        };
        if !call_modes.is_empty() && names.is_empty() {
            return Err(format!(
                "--systems names none of the systems of mode {} (known: {})",
                call_modes
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                systems::ALL.join(", ")
            ));
        }
        let attrs_names: Vec<&'static str> = if !attrs {
            Vec::new()
        } else if args.systems.is_empty() {
            systems::ATTRS.to_vec()
        } else {
            systems::ATTRS.iter().copied().filter(named).collect()
        };
        if attrs && attrs_names.is_empty() {
            return Err(format!(
                "--systems names none of the attrs mode's rows ({})",
                systems::ATTRS.join(", ")
            ));
        }
        let random_sizes = if random {
            random_buffers(args)?
        } else {
            Vec::new()
        };
        check_sizes_fit(args)?;
        let call_modes = call_modes
            .iter()
            .map(|m| ModePlan::new(m, &names, args.systems.is_empty()))
            .collect();
        Ok(Plan {
            modes,
            call_modes,
            names,
            attrs: attrs_names,
            random: random_sizes,
            realloc,
            sparse,
            programs,
            programs_reps: args.reps.unwrap_or(1),
        })
    }

    /// What the progress bar counts: a step per row for its warm-up and one per repetition
    /// (`reps` for a row of calls, `random_reps` for a random mode row), over the rows whose
    /// system `runs_here` (present, and measured in this process).
    pub fn bar_len(
        &self,
        sizes: &[usize],
        reps: usize,
        random_reps: usize,
        runs_here: impl Fn(&str) -> bool,
    ) -> u64 {
        let cells = self
            .call_modes
            .iter()
            .flat_map(|m| m.cells(sizes))
            .filter(|(_, s)| runs_here(s))
            .count();
        (cells * (reps + 1)
            + sizes.len() * self.attrs.len() * (reps + 1)
            + self.random.len() * random::ROWS.len() * (random_reps + 1)) as u64
            + if self.realloc {
                crate::growth::steps()
            } else {
                0
            }
            + if self.sparse {
                crate::sparse::steps()
            } else {
                0
            }
            + if self.programs {
                crate::programs::steps(self.programs_reps)
            } else {
                0
            }
    }
}

/// The modes a run's arguments name, in order: `both` is tight and paced, `threads` one mode per
/// thread count.
fn expand_modes(args: &Args) -> Result<Vec<String>, String> {
    let mut modes: Vec<String> = Vec::new();
    for m in &args.mode {
        match m.as_str() {
            "both" => modes.extend(["tight".into(), "paced".into()]),
            "threads" => {
                for &t in &args.threads {
                    if !(1..=256).contains(&t) {
                        return Err(format!("--threads {t}: between 1 and 256"));
                    }
                    modes.push(format!("threads-{t}"));
                }
            }
            m => modes.push(m.into()),
        }
    }
    let mut seen = std::collections::HashSet::new();
    modes.retain(|m| seen.insert(m.clone()));
    Ok(modes)
}

/// The random mode's buffers, smallest first; all four of a size are held at once, so the
/// largest must fit in available memory.
fn random_buffers(args: &Args) -> Result<Vec<usize>, String> {
    let mut sizes: Vec<usize> = Vec::new();
    for (flag, bytes) in [
        ("--random-small", args.random_small),
        ("--random-bytes", args.random_bytes),
    ] {
        sizes.push(random::buffer_len(bytes).ok_or_else(|| {
            format!(
                "{flag} {bytes}: at most {}",
                measure::bytes(random::MAX_BYTES as u64)
            )
        })?);
    }
    sizes.sort_unstable();
    sizes.dedup();
    let largest = *sizes.last().unwrap_or(&0);
    let need = random::memory_needed(largest);
    if let Some(avail) = measure::mem_available()
        && need + (256 << 20) > avail
    {
        return Err(format!(
            "--random-bytes {}: the random mode holds four buffers of {} at once ({} in \
             all, with its chain), more than this machine's available memory ({} with \
             256 MiB to spare); choose a smaller --random-bytes",
            args.random_bytes,
            measure::bytes(largest as u64),
            measure::bytes(need),
            measure::bytes(avail)
        ));
    }
    Ok(sizes)
}

/// Every row holds at least one buffer of each size at once (threads mode one per thread,
/// pools and queues a few more): a size that cannot fit is refused here, clearly, rather
/// than by an allocation failure that aborts the process mid-run.
fn check_sizes_fit(args: &Args) -> Result<(), String> {
    if let (Some(&largest), Some(avail)) = (args.sizes.iter().max(), measure::mem_available()) {
        let threads = args.threads.iter().copied().max().unwrap_or(1).max(1);
        let need = (largest as u64).saturating_mul(4 + threads as u64);
        if need > avail {
            return Err(format!(
                "--sizes: a buffer of {} needs about {} at once (4 + threads buffers), more \
                 than this machine's available memory ({}); choose smaller sizes",
                measure::bytes(largest as u64),
                measure::bytes(need),
                measure::bytes(avail)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn plan(args: &[&str]) -> Result<Plan, String> {
        let args = Args::try_parse_from(std::iter::once("heap-bench").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        Plan::new(&args)
    }

    /// The default run: the four modes of calls (threads with 2 and 4), every system in tight,
    /// the general-purpose ones and the allocator layer in the others, at the seed's four sizes;
    /// and the realloc and sparse modes; neither attrs nor random.
    #[test]
    fn the_default_plan_is_the_protocols() {
        let p = plan(&[]).unwrap();
        assert_eq!(
            p.modes,
            [
                "tight",
                "paced",
                "loaded",
                "threads-2",
                "threads-4",
                "realloc",
                "sparse"
            ]
        );
        assert!(p.realloc && p.sparse);
        assert_eq!(p.names, systems::ALL);
        assert!(p.attrs.is_empty() && p.random.is_empty());
        let m = &p.call_modes;
        assert_eq!(m[0].systems, systems::ALL);
        for mode in &m[1..] {
            assert_eq!(mode.systems.len(), 10, "{mode:?}");
            assert!(mode.systems.iter().all(|s| systems::in_every_mode(s)));
        }
        assert!(!m[0].work && m[1].work && m[2].work && !m[3].work);
        assert!(m[2].load && !m[1].load);
        assert_eq!((m[3].threads, m[4].threads), (Some(2), Some(4)));
        let sizes = [4096, 1 << 20];
        let cells: Vec<_> = m[1].cells(&sizes).collect();
        assert_eq!(cells.len(), 20);
        assert_eq!(cells[0], (4096, "pagepool"));
        assert_eq!(cells[10], (1 << 20, "pagepool"));
        // Warm-up and repetitions, every row: 14 + 4 * 10 systems, two sizes, three steps each.
        let growth = crate::growth::steps() + crate::sparse::steps();
        assert_eq!(
            p.bar_len(&sizes, 2, 5, |_| true),
            (14 + 4 * 10) * 2 * 3 + growth
        );
        assert_eq!(
            p.bar_len(&sizes, 2, 5, |s| s != "dmabuf"),
            (13 + 4 * 10) * 2 * 3 + growth
        );
    }

    /// Named systems run in every mode named, in table order, the extra rows among them; the
    /// attrs and random modes have their own rows.
    #[test]
    fn named_systems_run_in_every_mode_in_table_order() {
        let p = plan(&[
            "--mode",
            "loaded,tight,attrs,both",
            "--systems",
            "pagepool-control,mmap,pagepool,pagepool-sync,mmap-thp",
        ])
        .unwrap();
        assert_eq!(p.modes, ["loaded", "tight", "attrs", "paced"]);
        let want = ["pagepool", "mmap", "pagepool-sync", "pagepool-control"];
        assert_eq!(p.names, want);
        for m in &p.call_modes {
            assert_eq!(m.systems, want, "{}", m.name);
        }
        assert_eq!(p.attrs, ["mmap-thp"]);
        let p = plan(&[
            "--mode",
            "random",
            "--random-bytes",
            "4M",
            "--random-small",
            "3M",
        ])
        .unwrap();
        assert!(p.call_modes.is_empty() && p.names.is_empty());
        assert_eq!(p.random, [4 << 20]);
    }

    /// Refusals name what is wrong.
    #[test]
    fn plans_that_cannot_run_are_refused() {
        let err = |a: &[&str]| plan(a).unwrap_err();
        assert!(err(&["--reps", "0"]).contains("--reps"));
        assert!(err(&["--iters", "0"]).contains("--iters"));
        assert!(err(&["--systems", "nope"]).contains("unknown system"));
        assert!(err(&["--mode", "threads", "--threads", "300"]).contains("--threads 300"));
        assert!(err(&["--mode", "tight", "--systems", "mmap-thp"]).contains("none of the systems"));
        assert!(err(&["--mode", "attrs", "--systems", "pagepool"]).contains("attrs mode's rows"));
    }
}
