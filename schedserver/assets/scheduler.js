// dispynb-scheduler monitor: polls /api/scheduler, renders with DOM text only
// (no innerHTML: user and node names are data, never markup).
"use strict";

let csrf = "";

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fill(tbody, items, render) {
  tbody.replaceChildren();
  for (const item of items) {
    const row = document.createElement("tr");
    render(row, item);
    tbody.appendChild(row);
  }
}

function percent(x) {
  return (100 * x).toFixed(0) + " %";
}

async function revoke(name) {
  if (!window.confirm(`Revoke user ${name}? Its sessions end and its jobs stop.`)) return;
  const reply = await fetch(`/api/users/${encodeURIComponent(name)}/revoke`, {
    method: "POST",
    headers: { ...authHeaders(), "X-CSRF-Token": csrf },
  });
  const body = await reply.json();
  document.getElementById("message").textContent = reply.ok
    ? `revoked ${body.revoked}`
    : `refused: ${body.reason}`;
  refresh();
}

/** A node's CPU % available: "" if it reports none, "unknown" while it cannot
 * read the figure (null: a node out of file descriptors). */
function cpuAvail(avail) {
  if (!avail.length) return "";
  return avail[0] === null ? "unknown" : avail[0].toFixed(0) + " %";
}

function render(snap) {
  document.getElementById("sched-name").textContent = snap.name;
  document.getElementById("cpus").textContent = `${snap.cpus} CPUs up`;
  fill(document.querySelector("#nodes tbody"), snap.nodes, (row, node) => {
    cell(row, node.name || "?");
    cell(row, node.id);
    cell(row, node.alive ? "up" : node.down ? `down: ${node.down}` : "down");
    cell(row, node.cpus, "num");
    cell(row, node.jobs, "num");
    cell(row, cpuAvail(node.avail), "num");
  });
  fill(document.querySelector("#users tbody"), snap.users, (row, user) => {
    cell(row, user.name + (user.revoked ? " (revoked)" : ""));
    cell(row, user.sessions.join(", "));
    cell(row, user.computations, "num");
    cell(row, user.queued, "num");
    cell(row, user.running, "num");
    cell(row, user.done, "num");
    cell(row, percent(user.cpu_share), "num");
    cell(row, `${user.max_cpus ?? "-"} / ${user.max_queued ?? "-"}`);
    const td = cell(row, "");
    if (!user.revoked) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "danger";
      button.textContent = "Revoke";
      button.addEventListener("click", () => revoke(user.name));
      td.appendChild(button);
    }
  });
  const box = document.getElementById("computations");
  box.replaceChildren();
  document.getElementById("no-comps").hidden = snap.computations.length > 0;
  for (const comp of snap.computations) {
    const title = document.createElement("h3");
    title.textContent =
      `${comp.user} / ${comp.name} (client ${comp.client}${comp.exclusive ? ", exclusive" : ""}): ` +
      `${comp.queued} queued, ${comp.running} running, ${comp.done} done`;
    box.appendChild(title);
    const table = document.createElement("table");
    const tbody = document.createElement("tbody");
    table.appendChild(tbody);
    fill(tbody, comp.jobs, (row, job) => {
      cell(row, job.key, "num");
      cell(row, job.state);
      cell(row, job.node);
    });
    box.appendChild(table);
  }
}

async function refresh() {
  const badge = document.getElementById("connection");
  try {
    const reply = await fetch("/api/scheduler", { headers: authHeaders() });
    if (!reply.ok) throw new Error((await reply.json()).reason);
    csrf = reply.headers.get("X-CSRF-Token") || csrf;
    render(await reply.json());
    badge.textContent = "live";
    badge.className = "badge badge-live";
  } catch (error) {
    badge.textContent = String(error.message || error);
    badge.className = "badge badge-error";
  }
}

refresh();
window.setInterval(refresh, 2000);
