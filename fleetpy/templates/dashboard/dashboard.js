// Live updates: the server pushes a snapshot (server-sent events) whenever the registry changes.
"use strict";

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function fill(id, rows) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...rows);
}

function render(data) {
  fill("units", data.units.map((u) => {
    const tr = document.createElement("tr");
    tr.dataset.unit = u.name;
    tr.className = u.health;
    const name = document.createElement("td");
    const link = document.createElement("a");
    link.href = `/ui/units/${encodeURIComponent(u.name)}`;
    link.textContent = u.name;
    name.append(link);
    tr.append(name, cell(u.machineID.slice(0, 8) || "-"), cell(u.desiredState), cell(u.activeState, "active"),
      cell(u.subState), cell(u.health, "health"), cell(u.reason));
    return tr;
  }));
  fill("machines", data.machines.map((m) => {
    const tr = document.createElement("tr");
    tr.dataset.machine = m.id;
    const metadata = Object.keys(m.metadata).sort().map((k) => `${k}=${m.metadata[k]}`).join(" ");
    tr.append(cell(m.id.slice(0, 8)), cell(m.primaryIP || "-"), cell(metadata), cell(m.units.join(", ")));
    return tr;
  }));
  fill("events", data.events.map((e) => {
    const tr = document.createElement("tr");
    tr.className = e.type;
    tr.append(cell(e.time.slice(11, 19)), cell(e.type), cell(e.kind), cell(e.machineID.slice(0, 8)), cell(e.message));
    return tr;
  }));
}

const live = document.getElementById("live");
const source = new EventSource("/ui/stream");
source.addEventListener("snapshot", (message) => {
  render(JSON.parse(message.data));
  live.textContent = `live, updated ${new Date().toLocaleTimeString()}`;
});
source.onerror = () => { live.textContent = "reconnecting..."; };
