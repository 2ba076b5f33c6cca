//! A cluster node's `/metrics`: the exposition of each partition it serves (each its own
//! engine's figures and the requests its router answered) joined into one, every series given a
//! `partition` label ("0".."N-1" or "control"), each metric family's help and type written once,
//! followed by the node's own `herald_cluster_partitions_served`. The node's own series
//! (connections refused by its listener) are shown once, without a partition.

/// Series of the node as a whole (its listener's), shown once and without a partition.
const NODE_WIDE: &[&str] = &["herald_connections_refused"];

/// The exposition of `texts` (partition name, that partition's exposition), labelled.
pub fn by_partition(texts: &[(String, String)], node_id: &str) -> String {
    // Families in the order first seen: (name, header lines, samples).
    let mut families: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    for (n, (partition, text)) in texts.iter().enumerate() {
        let first = n == 0;
        let mut current: Option<usize> = None;
        for line in text.lines() {
            if line == "# EOF" || line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let mut words = rest.splitn(3, ' ');
                let (_kind, name) = (words.next(), words.next().unwrap_or_default());
                let index = match families.iter().position(|(n, _, _)| n == name) {
                    Some(i) => i,
                    None => {
                        families.push((name.to_owned(), Vec::new(), Vec::new()));
                        families.len() - 1
                    }
                };
                if !families[index].1.iter().any(|l| l == line) {
                    families[index].1.push(line.to_owned());
                }
                current = Some(index);
                continue;
            }
            let node_wide = NODE_WIDE.iter().any(|name| line.starts_with(name));
            if node_wide && !first {
                continue;
            }
            let labelled = if node_wide { line.to_owned() } else { with_label(line, partition) };
            match current {
                Some(i) => families[i].2.push(labelled),
                None => families.push((String::new(), Vec::new(), vec![labelled])),
            }
        }
    }
    let mut out = String::new();
    for (_, headers, samples) in &families {
        for line in headers.iter().chain(samples) {
            out.push_str(line);
            out.push('\n');
        }
    }
    let node = node_id.replace('\\', "\\\\").replace('"', "\\\"");
    out.push_str("# HELP herald_cluster_partitions_served Partitions this node serves now (the control partition counted).\n");
    out.push_str("# TYPE herald_cluster_partitions_served gauge\n");
    out.push_str(&format!("herald_cluster_partitions_served{{node=\"{node}\"}} {}\n", texts.len()));
    out.push_str("# EOF\n");
    out
}

/// A sample line with `partition="<name>"` as its first label.
fn with_label(line: &str, partition: &str) -> String {
    let label = format!("partition=\"{partition}\"");
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let (name, rest) = line.split_at(name_end);
    match rest.strip_prefix('{') {
        Some(labels) if labels.starts_with('}') => format!("{name}{{{label}{labels}"),
        Some(labels) => format!("{name}{{{label},{labels}"),
        None => format!("{name}{{{label}}}{rest}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_series_gets_its_partition_and_each_family_one_header() {
        let text = "# HELP herald_connections_refused_total R.\n# TYPE herald_connections_refused_total counter\nherald_connections_refused_total 4\n# HELP a_total As.\n# TYPE a_total counter\na_total 3\n# HELP b B.\n# TYPE b gauge\nb{x=\"1\"} 2\n# EOF\n";
        let out = by_partition(&[("0".into(), text.into()), ("control".into(), text.into())], "n1");
        let expected = "# HELP herald_connections_refused_total R.\n# TYPE herald_connections_refused_total counter\nherald_connections_refused_total 4\n# HELP a_total As.\n# TYPE a_total counter\na_total{partition=\"0\"} 3\na_total{partition=\"control\"} 3\n\
            # HELP b B.\n# TYPE b gauge\nb{partition=\"0\",x=\"1\"} 2\nb{partition=\"control\",x=\"1\"} 2\n";
        assert!(out.starts_with(expected), "{out}");
        assert!(out.contains("herald_cluster_partitions_served{node=\"n1\"} 2\n"));
        assert!(out.ends_with("# EOF\n") && out.matches("# EOF").count() == 1);
    }
}
