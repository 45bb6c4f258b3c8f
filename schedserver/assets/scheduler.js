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

/** What a computation's client did with its nodes (set_node_cpus,
 * deallocate_node, close_node, its NodeAllocate) and an exclusive=True declined:
 * one line each; `label` names a node by its id. */
function nodeUses(comp, label) {
  const said = [];
  for (const [node, cpus] of Object.entries(comp.limits)) {
    said.push(
      cpus === 0
        ? `${label(node)}: taken out (deallocate_node)`
        : `${label(node)}: at most ${cpus} of its jobs at once (set_node_cpus)`,
    );
  }
  for (const node of comp.nodes_closed) {
    said.push(`${label(node)}: closed (close_node), until allocate_node`);
  }
  for (const node of comp.nodes_declined) {
    said.push(`${label(node)}: declined by its NodeAllocate`);
  }
  for (const node of comp.nodes_undecided) {
    said.push(`${label(node)}: waits for its NodeAllocate's answer`);
  }
  if (comp.exclusive_declined) {
    said.push("exclusive=True declined (its user is not in --exclusive_users): runs shared");
  }
  return said;
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
    cell(
      row,
      user.name +
        (user.revoked ? " (revoked)" : user.exclusive ? " (may run exclusive)" : ""),
    );
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
  const names = new Map(snap.nodes.map((node) => [node.id, node.name]));
  const label = (id) => (names.get(id) ? `${names.get(id)} (${id})` : id);
  for (const comp of snap.computations) {
    const title = document.createElement("h3");
    title.textContent =
      `${comp.user} / ${comp.name} (client ${comp.client}${comp.exclusive ? ", exclusive" : ""}): ` +
      `${comp.queued} queued, ${comp.running} running, ${comp.done} done`;
    box.appendChild(title);
    const uses = nodeUses(comp, label);
    if (uses.length) {
      const list = document.createElement("ul");
      list.className = "node-uses muted";
      for (const text of uses) {
        const item = document.createElement("li");
        item.textContent = text;
        list.appendChild(item);
      }
      box.appendChild(list);
    }
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
