#!/bin/sh
# Install fleetpy on a Debian machine and apply its cloud-config user-data.
# Usage: fleetpy-bootstrap USER_DATA [PRIVATE_IPV4] [FLEETPY_SOURCE]
# Run by cloud-init's runcmd (the script is embedded in the rendered user-data) and by
# the Vagrantfile's shell provisioner (from the synced checkout): one script for both.
set -eu
user_data=$1
ip=${2:-}
source=${3:-/vagrant}

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q python3-venv etcd-server etcd-client
# Debian's package enables etcd.service; the user-data masks it in favour of etcd2.service.
[ -x /opt/fleetpy/bin/pip ] || python3 -m venv /opt/fleetpy
/opt/fleetpy/bin/pip install -q --upgrade "$source"
for tool in fleetpy fleetd fleetctl; do
    ln -sf "/opt/fleetpy/bin/$tool" "/usr/local/bin/$tool"
done
if [ -n "$ip" ]; then
    exec fleetpy cloud-config apply --private-ipv4 "$ip" --public-ipv4 "$ip" "$user_data"
fi
exec fleetpy cloud-config apply "$user_data"
