//! Whether the machine was busy with something else while a benchmark measured, from /proc: the
//! steal time of the virtual machine, and the CPU time of the processes that are not the ones
//! measured.
//!
//! A share here is of the machine's capacity over the interval: all its CPUs' time, as the `cpu`
//! line of /proc/stat counts it (the cores times the wall time). Everything is read in clock ticks
//! (USER_HZ), in which /proc/stat and /proc/<pid>/stat both count, so no tick rate is needed.
//!
//! Other processes' CPU is the sum, over every process that is not measured, of its user and
//! system time (`utime` + `stime` of /proc/<pid>/stat) at the end minus at the start; a process
//! that started during the interval counts with all its time. A process that started and ended
//! in between is not seen. That sum was chosen over "all busy time in /proc/stat minus the
//! measured processes' time", which sees the short-lived processes too, because the remainder
//! also holds interrupt and softirq time and the kernel threads' work for the measured
//! processes themselves (the loopback network between assetflow, RabbitMQ and PostgreSQL, the
//! file system journal behind PostgreSQL's commits): it would call the benchmark's own load
//! someone else's. Kernel threads are reported on their own, and not counted as other processes.

use std::collections::HashMap;

use serde::Serialize;

/// OTHER_CPU_THRESHOLD is the share of the machine that other processes may use before a run is
/// reported as taken on a busy machine.
pub const OTHER_CPU_THRESHOLD: f64 = 0.05;
/// STEAL_THRESHOLD is the share of the machine's time the hypervisor may give to other machines
/// before a run is reported as taken on a busy machine.
pub const STEAL_THRESHOLD: f64 = 0.02;

/// BROKER_NAMES are the processes of RabbitMQ (the Erlang VM and its helpers), found by name when
/// they do not run as the `rabbitmq` user.
const BROKER_NAMES: &[&str] = &["beam.smp", "erl_child_setup", "epmd", "inet_gethost", "heart", "rabbitmq-server"];
/// DATABASE_NAMES are PostgreSQL's processes, found by name when they do not run as `postgres`.
const DATABASE_NAMES: &[&str] = &["postgres", "postmaster"];
/// PF_KTHREAD is the flag of a kernel thread in /proc/<pid>/stat (`include/linux/sched.h`).
const PF_KTHREAD: u64 = 0x0020_0000;

/// CpuTotals is the time of all CPUs together, from the `cpu` line of /proc/stat, in ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTotals {
    /// user, nice, system, idle, iowait, irq, softirq and steal: everything the CPUs spent their
    /// time on. guest and guest_nice are left out, as user and nice already count them.
    pub total: u64,
    pub steal: u64,
}

/// parse_cpu_totals reads the `cpu` line of /proc/stat.
pub fn parse_cpu_totals(proc_stat: &str) -> Option<CpuTotals> {
    let line = proc_stat.lines().find(|l| l.split_whitespace().next() == Some("cpu"))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    if fields.len() < 8 {
        return None;
    }
    Some(CpuTotals { total: fields[..8].iter().sum(), steal: fields[7] })
}

/// ProcessStat is what /proc/<pid>/stat says of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessStat {
    pub pid: u32,
    pub name: String,
    pub ppid: u32,
    pub flags: u64,
    /// User and system time, in ticks, of all the process's threads.
    pub ticks: u64,
    /// When it started, in ticks since boot: with the pid, it tells a reused pid apart.
    pub start: u64,
}

/// parse_process_stat reads /proc/<pid>/stat. The name is in parentheses and may itself hold
/// spaces and parentheses, so the fields are counted from the last `)`.
pub fn parse_process_stat(text: &str) -> Option<ProcessStat> {
    let (head, rest) = text.rsplit_once(')')?;
    let (pid, name) = head.split_once(" (")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state (field 3 of proc(5)), ppid (4), ..., flags (9), ..., utime (14),
    // stime (15), ..., starttime (22).
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    Some(ProcessStat {
        pid: pid.trim().parse().ok()?,
        name: name.to_string(),
        ppid: field(4)? as u32,
        flags: field(9)?,
        ticks: field(14)? + field(15)?,
        start: field(22)?,
    })
}

/// parse_uid reads the real user id from /proc/<pid>/status.
pub fn parse_uid(status: &str) -> Option<u32> {
    status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|ids| ids.split_whitespace().next()?.parse().ok())
}

/// parse_users reads user names by id from /etc/passwd.
pub fn parse_users(passwd: &str) -> HashMap<u32, String> {
    passwd
        .lines()
        .filter_map(|l| {
            let mut fields = l.split(':');
            let name = fields.next()?;
            let uid = fields.nth(1)?.parse().ok()?;
            Some((uid, name.to_string()))
        })
        .collect()
}

/// Class is whose a process's time is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// A process being measured, of one of the parties, or a child of one.
    Measured(Party),
    Kernel,
    Other,
}

/// Party is one of the measured parties that share the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Party {
    Assetflow,
    Database,
    Broker,
    /// The benchmark itself, with the simulators it runs.
    Benchmark,
}

impl Party {
    pub const ALL: [Party; 4] = [Party::Assetflow, Party::Database, Party::Broker, Party::Benchmark];

    pub fn as_str(self) -> &'static str {
        match self {
            Party::Assetflow => "assetflow",
            Party::Database => "PostgreSQL",
            Party::Broker => "RabbitMQ",
            Party::Benchmark => "the benchmark",
        }
    }
}

/// classify tells each process's class: measured if it is the benchmark, one of `assetflow`, runs
/// as a service's user (`owners` has the user of each pid) or has a service's name, or descends from
/// a measured process; a kernel thread; or other.
pub fn classify(
    processes: &[ProcessStat],
    owners: &HashMap<u32, String>,
    assetflow: &[u32],
    benchmark: Option<u32>,
) -> HashMap<u32, Class> {
    let mut class: HashMap<u32, Class> = processes
        .iter()
        .map(|p| {
            let user = owners.get(&p.pid).map(String::as_str).unwrap_or("");
            let c = if p.flags & PF_KTHREAD != 0 {
                Class::Kernel
            } else if Some(p.pid) == benchmark {
                Class::Measured(Party::Benchmark)
            } else if assetflow.contains(&p.pid) {
                Class::Measured(Party::Assetflow)
            } else if user == "rabbitmq" || BROKER_NAMES.contains(&p.name.as_str()) {
                Class::Measured(Party::Broker)
            } else if user == "postgres" || DATABASE_NAMES.contains(&p.name.as_str()) {
                Class::Measured(Party::Database)
            } else {
                Class::Other
            };
            (p.pid, c)
        })
        .collect();
    // Children of measured processes (a shell RabbitMQ starts, a command the benchmark runs).
    let mut changed = true;
    while changed {
        changed = false;
        for p in processes {
            if class.get(&p.pid) == Some(&Class::Other)
                && let Some(&Class::Measured(party)) = class.get(&p.ppid)
            {
                class.insert(p.pid, Class::Measured(party));
                changed = true;
            }
        }
    }
    class
}

/// Sample is one process's time at a snapshot.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    class: Class,
    ticks: u64,
}

/// Snapshot is the machine's CPU time and every process's, at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    cpu: CpuTotals,
    /// By pid and start time.
    processes: HashMap<(u32, u64), Sample>,
}

impl Snapshot {
    /// Snapshot::take reads /proc now. `assetflow` are the assetflow processes being measured; the
    /// benchmark itself, RabbitMQ and PostgreSQL are always measured.
    pub fn take(assetflow: &[u32]) -> anyhow::Result<Snapshot> {
        let cpu = parse_cpu_totals(&std::fs::read_to_string("/proc/stat")?)
            .ok_or_else(|| anyhow::anyhow!("/proc/stat has no cpu line"))?;
        let users = parse_users(&std::fs::read_to_string("/etc/passwd").unwrap_or_default());
        let mut processes = Vec::new();
        let mut owners = HashMap::new();
        for entry in std::fs::read_dir("/proc")? {
            let entry = entry?;
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            // A process may end while it is read: it is then left out.
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            let Some(stat) = parse_process_stat(&stat) else { continue };
            if let Some(uid) = std::fs::read_to_string(entry.path().join("status")).ok().as_deref().and_then(parse_uid)
                && let Some(name) = users.get(&uid)
            {
                owners.insert(pid, name.clone());
            }
            processes.push(stat);
        }
        Ok(Snapshot::of(cpu, processes, &owners, assetflow, Some(std::process::id())))
    }

    /// Snapshot::of is a snapshot of what was read, with the user of each pid.
    pub fn of(
        cpu: CpuTotals,
        processes: Vec<ProcessStat>,
        owners: &HashMap<u32, String>,
        assetflow: &[u32],
        benchmark: Option<u32>,
    ) -> Snapshot {
        let class = classify(&processes, owners, assetflow, benchmark);
        let processes = processes
            .into_iter()
            .map(|p| {
                let class = class.get(&p.pid).copied().unwrap_or(Class::Other);
                ((p.pid, p.start), Sample { name: p.name, class, ticks: p.ticks })
            })
            .collect();
        Snapshot { cpu, processes }
    }
}

/// Busy is what else the machine did over an interval.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Busy {
    pub seconds: f64,
    /// The CPU time of the processes not measured, as a share of the machine's capacity.
    pub other_cpu_share: f64,
    /// The CPU time of kernel threads, as a share of the machine's capacity. Much of it is work
    /// for the measured processes (their network and disk I/O), so it is not counted as busy.
    pub kernel_cpu_share: f64,
    /// The time the hypervisor gave to other machines, as a share of the machine's capacity.
    pub steal_share: f64,
    /// The other processes that used the most, by name, with their share (at most five).
    pub top_others: Vec<Other>,
    /// The CPU seconds (user and system) each measured party used, children included.
    pub parties: Vec<PartyCpu>,
    /// Whether other processes or steal passed their threshold.
    pub busy: bool,
}

/// Other is a name of processes not measured, and the share of the machine they used.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Other {
    pub name: String,
    pub share: f64,
}

/// PartyCpu is the CPU time one measured party used over the interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PartyCpu {
    pub party: Party,
    pub cpu_seconds: f64,
}

/// busy compares two snapshots of the same machine.
pub fn busy(before: &Snapshot, after: &Snapshot, seconds: f64) -> Busy {
    let capacity = after.cpu.total.saturating_sub(before.cpu.total).max(1) as f64;
    let mut by_class: HashMap<Class, u64> = HashMap::new();
    let mut others: HashMap<&str, u64> = HashMap::new();
    for (key, sample) in &after.processes {
        // A process that started during the interval counts with all its time.
        let used = sample.ticks.saturating_sub(before.processes.get(key).map(|b| b.ticks).unwrap_or(0));
        *by_class.entry(sample.class).or_default() += used;
        if sample.class == Class::Other && used > 0 {
            *others.entry(sample.name.as_str()).or_default() += used;
        }
    }
    let share = |class| *by_class.get(&class).unwrap_or(&0) as f64 / capacity;
    let mut top_others: Vec<Other> = others
        .into_iter()
        .map(|(name, ticks)| Other { name: name.to_string(), share: ticks as f64 / capacity })
        .collect();
    top_others.sort_by(|a, b| b.share.total_cmp(&a.share).then_with(|| a.name.cmp(&b.name)));
    top_others.truncate(5);
    let other_cpu_share = share(Class::Other);
    // Ticks are USER_HZ, 1/100 s on Linux.
    let parties = Party::ALL
        .into_iter()
        .map(|party| PartyCpu {
            party,
            cpu_seconds: *by_class.get(&Class::Measured(party)).unwrap_or(&0) as f64 / 100.0,
        })
        .collect();
    let steal_share = after.cpu.steal.saturating_sub(before.cpu.steal) as f64 / capacity;
    Busy {
        seconds,
        other_cpu_share,
        kernel_cpu_share: share(Class::Kernel),
        steal_share,
        top_others,
        parties,
        busy: other_cpu_share > OTHER_CPU_THRESHOLD || steal_share > STEAL_THRESHOLD,
    }
}

impl Busy {
    /// Busy::warning is the line that says the machine was busy, if it was.
    pub fn warning(&self, during: &str) -> Option<String> {
        if !self.busy {
            return None;
        }
        let top: Vec<String> =
            self.top_others.iter().take(3).map(|o| format!("{} {:.1}%", o.name, o.share * 100.0)).collect();
        Some(format!(
            "the machine was busy {during}: other processes used {:.1}% of its CPU ({}), steal {:.1}% \
             (thresholds {:.0}% and {:.0}%)",
            self.other_cpu_share * 100.0,
            if top.is_empty() { "none seen".to_string() } else { top.join(", ") },
            self.steal_share * 100.0,
            OTHER_CPU_THRESHOLD * 100.0,
            STEAL_THRESHOLD * 100.0,
        ))
    }
}

/// Watch is a snapshot taken at the start of an interval, to compare with the end.
pub struct Watch {
    started: std::time::Instant,
    before: Option<Snapshot>,
    assetflow: Vec<u32>,
}

impl Watch {
    /// Watch::start takes the first snapshot. Where /proc cannot be read, nothing is reported.
    pub fn start(assetflow: &[u32]) -> Watch {
        Watch {
            started: std::time::Instant::now(),
            before: Snapshot::take(assetflow).ok(),
            assetflow: assetflow.to_vec(),
        }
    }

    /// Watch::stop takes the second snapshot and compares.
    pub fn stop(self) -> Option<Busy> {
        let after = Snapshot::take(&self.assetflow).ok()?;
        Some(busy(&self.before?, &after, self.started.elapsed().as_secs_f64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC_STAT: &str = "cpu  19280 10 3807 13149 787 5 52 16 7 3
cpu0 9640 5 1900 6500 400 2 26 8 3 1
cpu1 9640 5 1907 6649 387 3 26 8 4 2
intr 1234 0 0
ctxt 99
";

    #[test]
    fn the_cpu_line_counts_every_state_but_guest_time_which_user_time_holds() {
        let cpu = parse_cpu_totals(PROC_STAT).expect("a cpu line");
        assert_eq!(cpu.total, 19280 + 10 + 3807 + 13149 + 787 + 5 + 52 + 16);
        assert_eq!(cpu.steal, 16);
        assert_eq!(parse_cpu_totals("cpu0 1 2 3\n"), None);
    }

    #[test]
    fn a_process_name_with_spaces_and_parentheses_does_not_shift_the_fields() {
        let text =
            "3010 (erl (child) setup) S 2999 2954 2954 0 -1 4194560 97 0 0 0 120 35 0 0 20 0 1 0 18745 3133440 380";
        let p = parse_process_stat(text).expect("parsed");
        assert_eq!(p.pid, 3010);
        assert_eq!(p.name, "erl (child) setup");
        assert_eq!(p.ppid, 2999);
        assert_eq!(p.flags, 4194560);
        assert_eq!(p.ticks, 155);
        assert_eq!(p.start, 18745);
    }

    #[test]
    fn the_real_uid_and_its_name_are_read() {
        let status =
            "Name:\tbeam.smp\nUmask:\t0027\nState:\tS (sleeping)\nUid:\t106\t106\t106\t106\nGid:\t109\t109\t109\t109\n";
        assert_eq!(parse_uid(status), Some(106));
        let users = parse_users(
            "root:x:0:0:root:/root:/bin/bash\npostgres:x:101:104:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash\nrabbitmq:x:106:109::/var/lib/rabbitmq:/usr/sbin/nologin\n",
        );
        assert_eq!(users.get(&106).map(String::as_str), Some("rabbitmq"));
        assert_eq!(users.get(&101).map(String::as_str), Some("postgres"));
    }

    fn process(pid: u32, name: &str, ppid: u32, flags: u64, ticks: u64) -> ProcessStat {
        ProcessStat { pid, name: name.into(), ppid, flags, ticks, start: 1000 + pid as u64 }
    }

    #[test]
    fn the_services_their_children_and_the_measured_pids_are_measured_kernel_threads_apart() {
        let processes = vec![
            process(10, "assetflow", 9, 0, 0),
            process(11, "kill", 9, 0, 0),
            process(9, "assetflow", 1, 0, 0),
            process(20, "beam.smp", 1, 0, 0),
            process(21, "sh", 20, 0, 0),
            process(30, "postgres", 1, 0, 0),
            process(40, "my-postgres-helper", 1, 0, 0),
            process(50, "kworker/0:1", 2, PF_KTHREAD, 0),
            process(60, "rustc", 1, 0, 0),
        ];
        let users: HashMap<u32, String> = [(40, "postgres".to_string()), (60, "root".to_string())].into();
        let class = classify(&processes, &users, &[10], Some(9));
        for (pid, party) in [
            (9, Party::Benchmark),
            (10, Party::Assetflow),
            (11, Party::Benchmark),
            (20, Party::Broker),
            (21, Party::Broker),
            (30, Party::Database),
            (40, Party::Database),
        ] {
            assert_eq!(class[&pid], Class::Measured(party), "{pid}");
        }
        assert_eq!(class[&50], Class::Kernel);
        assert_eq!(class[&60], Class::Other);
    }

    #[test]
    fn busy_counts_others_and_steal_as_shares_of_all_cpu_time_and_new_processes_whole() {
        let users = HashMap::new();
        let before = Snapshot::of(
            CpuTotals { total: 10_000, steal: 100 },
            vec![process(9, "assetflow", 1, 0, 500), process(60, "rustc", 1, 0, 1_000), process(70, "sshd", 1, 0, 5)],
            &users,
            &[9],
            None,
        );
        // 2,000 ticks of capacity: 2 cores for 10 s at 100 ticks a second.
        let after = Snapshot::of(
            CpuTotals { total: 12_000, steal: 160 },
            vec![
                process(9, "assetflow", 1, 0, 1_500),
                process(60, "rustc", 1, 0, 1_100),
                process(70, "sshd", 1, 0, 5),
                process(80, "cc1", 60, 0, 40),
                process(81, "kworker/1:0", 2, PF_KTHREAD, 30),
            ],
            &users,
            &[9],
            None,
        );
        let b = busy(&before, &after, 10.0);
        assert!((b.other_cpu_share - 0.07).abs() < 1e-9, "{b:?}");
        assert!((b.kernel_cpu_share - 0.015).abs() < 1e-9, "{b:?}");
        assert!((b.steal_share - 0.03).abs() < 1e-9, "{b:?}");
        let top: Vec<(&str, f64)> = b.top_others.iter().map(|o| (o.name.as_str(), o.share)).collect();
        assert_eq!(top, vec![("rustc", 0.05), ("cc1", 0.02)]);
        let assetflow = b.parties.iter().find(|p| p.party == Party::Assetflow).expect("assetflow");
        assert!((assetflow.cpu_seconds - 10.0).abs() < 1e-9, "{b:?}");
        assert!(b.busy);
        let warning = b.warning("during run 1").expect("a warning");
        assert!(warning.starts_with("the machine was busy during run 1: other processes used 7.0%"), "{warning}");
    }

    #[test]
    fn a_quiet_machine_is_not_busy_and_says_nothing() {
        let users = HashMap::new();
        let before =
            Snapshot::of(CpuTotals { total: 0, steal: 0 }, vec![process(60, "sshd", 1, 0, 0)], &users, &[], None);
        let after =
            Snapshot::of(CpuTotals { total: 2_000, steal: 20 }, vec![process(60, "sshd", 1, 0, 60)], &users, &[], None);
        let b = busy(&before, &after, 10.0);
        assert!(!b.busy, "{b:?}");
        assert_eq!(b.warning("during run 1"), None);
    }
}
