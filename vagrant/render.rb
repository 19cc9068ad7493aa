# Renders vagrant/user-data.erb, the Ruby twin of fleetpy/templates/user-data.yaml.j2, so
# that `vagrant up` needs no Python on the host. tests/test_vagrant.py checks that both
# templates give the same text for the same node.
require "erb"
require "json"

module FleetpyUserData
  TOP = File.expand_path("..", __dir__)
  TEMPLATE = File.join(TOP, "vagrant", "user-data.erb")
  BOOTSTRAP = File.join(TOP, "fleetpy", "templates", "fleetpy-bootstrap.sh")

  def self.node_name(prefix, index)
    format("%s-%02d", prefix, index)
  end

  # The user-data of node `index` (from 1) among the nodes at `ips`.
  def self.render(index:, ips:, name_prefix:, metadata:, fleetpy_source:, ssh_authorized_keys:, cluster_token:)
    names = (1..ips.length).map { |i| node_name(name_prefix, i) }
    values = {
      name: names[index - 1],
      index: index,
      count: ips.length,
      ip: ips[index - 1],
      initial_cluster: names.zip(ips).map { |n, ip| "#{n}=http://#{ip}:2380" }.join(","),
      etcd_servers: ips.map { |ip| "http://#{ip}:2379" }.join(","),
      metadata: metadata,
      fleetpy_source: fleetpy_source,
      ssh_authorized_keys: ssh_authorized_keys,
      cluster_token: cluster_token,
      # As in render.py: without the final newline, which the template's own line end adds.
      bootstrap: File.read(BOOTSTRAP).sub(/\n+\z/, ""),
    }
    ERB.new(File.read(TEMPLATE), trim_mode: "-").result_with_hash(values)
  end
end
