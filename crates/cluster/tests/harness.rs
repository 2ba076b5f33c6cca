//! The NATS harness itself: three servers form one JetStream cluster, an R3 stream takes a
//! message, and dropping the harness kills every server.

use std::time::Duration;

use herald_cluster::testing::NatsCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_form_one_jetstream_cluster_and_die_with_the_harness() {
    let nats =
        tokio::time::timeout(Duration::from_secs(40), NatsCluster::start(3)).await.expect("ready in time");
    let pids: Vec<u32> = (0..3).map(|i| nats.pid(i).unwrap()).collect();
    let client = async_nats::connect(nats.addrs()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "T".into(),
            subjects: vec!["t".into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    let ack = js.publish("t", "hello".into()).await.unwrap().await.unwrap();
    assert_eq!(ack.sequence, 1);
    assert_eq!(stream.cached_info().config.num_replicas, 3);
    drop(js);
    drop(nats);
    for pid in pids {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "server {pid} still runs");
    }
}
