// Tally's page. Everything from the server is put in the page with
// textContent (never innerHTML), so an invoice named <script> is text.
'use strict';

const $ = (id) => document.getElementById(id);
let info = { demo: false, chaos: false };
let views = [];          // from /api/views: name, columns, group_columns
const last = new Map();  // view name -> last rows, to flash what changed
let editing = null;      // the invoice id being edited

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function flash(node) {
  node.classList.remove('flash');
  void node.offsetWidth; // restart the transition
  node.classList.add('flash');
  setTimeout(() => node.classList.remove('flash'), 700);
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = { error: text }; }
  if (!response.ok) throw new Error((data && data.error) || response.statusText);
  return data;
}

function show(value) {
  return value === null || value === undefined ? '0' : String(value);
}

// --- views (right pane) -------------------------------------------------

function renderView(name, rows) {
  const view = views.find((v) => v.name === name);
  if (!view) return;
  const before = last.get(name);
  last.set(name, rows);
  if (view.group_columns.length === 0) {
    renderHeadline(view, rows[0] || {}, before && before[0]);
  } else {
    renderTable(view, rows, before);
  }
}

function renderHeadline(view, row, before) {
  let box = document.querySelector(`[data-view="${CSS.escape(view.name)}"]`);
  if (!box) {
    box = el('div', 'headline-view');
    box.dataset.view = view.name;
    view.columns.forEach((column, i) => {
      const card = el('div', 'big');
      card.dataset.column = column;
      card.append(el('span', 'label', `${view.name}.${column}`));
      const value = el('span', 'value');
      if (i === 0 && view.name === 'invoice_total') value.id = 'total';
      card.append(value);
      box.append(card);
    });
    box.style.display = 'contents';
    $('headline').append(box);
  }
  for (const card of box.querySelectorAll('.big')) {
    const column = card.dataset.column;
    const value = card.querySelector('.value');
    const text = show(row[column]);
    if (value.textContent !== text) {
      value.textContent = text;
      if (before !== undefined) flash(card);
    }
  }
}

function renderTable(view, rows, before) {
  let table = document.querySelector(`table[data-view="${CSS.escape(view.name)}"]`);
  if (!table) {
    table = el('table');
    table.dataset.view = view.name;
    table.append(el('caption', null, view.name));
    const head = el('tr');
    for (const column of view.columns) head.append(el('th', null, column));
    const thead = el('thead');
    thead.append(head);
    table.append(thead, el('tbody'));
    $('tables').append(table);
  }
  const key = (row) => JSON.stringify(view.group_columns.map((c) => row[c]));
  const old = new Map((before || []).map((row) => [key(row), JSON.stringify(row)]));
  const body = table.querySelector('tbody');
  const fresh = [];
  for (const row of rows) {
    const tr = el('tr');
    for (const column of view.columns) tr.append(el('td', null, row[column] === null ? 'NULL' : row[column]));
    if (before !== undefined && old.get(key(row)) !== JSON.stringify(row)) fresh.push(tr);
    body.append(tr);
  }
  // Replace the old rows in one go.
  while (body.rows.length > rows.length) body.deleteRow(0);
  fresh.forEach(flash);
}

// --- invoices (left pane, demo only) ------------------------------------

async function loadInvoices() {
  const invoices = await api('GET', '/api/invoices');
  const list = $('invoices');
  const items = invoices.reverse().map((invoice) => {
    const li = el('li');
    li.dataset.id = invoice.id;
    li.append(
      el('span', 'id', `#${invoice.id}`),
      el('span', 'inv-name', invoice.name),
      el('span', 'customer', `customer ${invoice.customer_id}`),
      el('span', 'amount', invoice.total),
    );
    const edit = el('button', 'edit', 'Edit');
    edit.type = 'button';
    edit.addEventListener('click', () => startEdit(invoice));
    const remove = el('button', 'delete', 'Delete');
    remove.type = 'button';
    remove.addEventListener('click', () => act(() => api('DELETE', `/api/invoices/${invoice.id}`)));
    li.append(edit, remove);
    return li;
  });
  list.replaceChildren(...items);
}

function startEdit(invoice) {
  editing = invoice.id;
  $('name').value = invoice.name;
  $('customer').value = invoice.customer_id;
  $('amount').value = invoice.total;
  $('save').textContent = `Save #${invoice.id}`;
  $('cancel').hidden = false;
  $('amount').focus();
}

function stopEdit() {
  editing = null;
  $('invoice-form').reset();
  $('customer').value = '1';
  $('save').textContent = 'Add';
  $('cancel').hidden = true;
}

async function act(action) {
  $('form-error').hidden = true;
  try {
    await action();
    await loadInvoices();
  } catch (err) {
    $('form-error').textContent = err.message;
    $('form-error').hidden = false;
  }
}

function setupForm() {
  $('invoice-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const invoice = {
      name: $('name').value,
      customer_id: parseInt($('customer').value, 10) || 0,
      total: $('amount').value.trim(),
    };
    const id = editing;
    act(async () => {
      if (id === null) await api('POST', '/api/invoices', invoice);
      else await api('PUT', `/api/invoices/${id}`, invoice);
      stopEdit();
    });
  });
  $('cancel').addEventListener('click', stopEdit);
}

// --- pipeline panel, chaos, verify --------------------------------------

function renderPipeline(p) {
  $('p-rate').textContent = show(p.events_per_second);
  const bytes = p.lag_bytes === null ? '?' : `${Math.round(p.lag_bytes)} B`;
  $('p-lag').textContent = `${bytes} · ${show(p.lag_ms)} ms`;
  $('p-dup').textContent = show(p.duplicates);
  $('p-stale').textContent = show(p.stale);
  $('p-dead').textContent = p.dead_letters === null ? '?' : String(p.dead_letters);
  $('chaos').checked = !!p.chaos;
  document.body.classList.toggle('chaos', !!p.chaos);
}

function setupControls() {
  $('chaos').addEventListener('change', async (event) => {
    const on = event.target.checked;
    document.body.classList.toggle('chaos', on);
    try { await api('POST', '/api/chaos', { on }); } catch (err) { event.target.checked = !on; }
  });
  $('verify').addEventListener('click', async () => {
    const out = $('verify-result');
    out.hidden = false;
    out.className = '';
    out.textContent = 'verifying…';
    try {
      const result = await api('POST', '/api/verify', {});
      out.className = result.equal ? 'good' : 'bad';
      out.textContent = `${result.report.trim()} (${result.ms} ms)`;
    } catch (err) {
      out.className = 'bad';
      out.textContent = err.message;
    }
  });
}

// --- the stream ---------------------------------------------------------

let invoicesDue = null;
function connect() {
  const stream = new EventSource('/api/stream');
  stream.addEventListener('open', () => {
    $('connection').textContent = 'live';
    $('connection').className = 'pill live';
  });
  stream.addEventListener('error', () => {
    $('connection').textContent = 'reconnecting…';
    $('connection').className = 'pill';
  });
  stream.addEventListener('view', (event) => {
    const message = JSON.parse(event.data);
    renderView(message.view, message.rows);
    // Someone else (psql) may have changed invoices: show them too.
    if (info.demo && !invoicesDue) {
      invoicesDue = setTimeout(() => { invoicesDue = null; loadInvoices().catch(() => {}); }, 150);
    }
  });
  stream.addEventListener('pipeline', (event) => renderPipeline(JSON.parse(event.data)));
}

async function main() {
  info = await api('GET', '/api/info');
  views = (await api('GET', '/api/views')).views;
  document.body.classList.toggle('serve', !info.demo);
  $('mode').textContent = info.demo ? 'demo' : 'live views';
  setupControls();
  if (info.demo) {
    setupForm();
    await loadInvoices();
  }
  connect();
}

main().catch((err) => {
  $('connection').textContent = `error: ${err.message}`;
});
