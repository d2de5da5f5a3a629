"""The page's own JavaScript (token clicks, branch controls, Keep) and CSS.

Knows nothing of Python state: the scripts read data-* attributes that render.py writes.
"""

TOKEN_JS = """
element.addEventListener('click', (ev) => {
  const t = ev.target.closest('[data-tok]');
  if (!t) return;
  const box = t.closest('[data-turn]');
  trigger('select', {index: parseInt(t.dataset.tok), value: box ? parseInt(box.dataset.turn) : null});
});
"""

BRANCH_JS = """
// The chat's ‹ k/n › controls: drawn into each message row that has alternatives, from the
// list the context panel carries (#branch-data), and redrawn whenever Gradio re-renders the chat.
const navOf = () => {
  const d = element.querySelector('#branch-data');
  try { return JSON.parse(d ? d.dataset.nav : '[]'); } catch (e) { return []; }
};
const draw = (turn, k, n) => {
  const b = (to, label, text) => to >= 0 && to < n
    ? `<button data-k='${to}' aria-label='${label}'>${text}</button>`
    : `<button disabled aria-label='${label}'>${text}</button>`;
  return `${b(k - 1, 'previous alternative', '‹')}<span class='branch-pos'>${k + 1}/${n}</span>`
    + `${b(k + 1, 'next alternative', '›')}`;
};
let queued = false;
const decorate = () => {
  queued = false;
  const chat = document.querySelector('#chatbot');
  if (!chat) return;
  const want = new Map(navOf().map(([m, t, k, n]) => [m, [t, k, n]]));
  let run = -1, prev = null;
  for (const row of chat.querySelectorAll('.message-row')) {
    const role = row.classList.contains('user-row') ? 'user' : 'bot';
    let el = row.querySelector('.branch-nav');
    if (role === prev) { if (el) el.remove(); continue; }  // one control per turn, on its first row
    prev = role; run += 1;
    const w = want.get(run), key = w ? w.join(',') : '';
    if (el && el.dataset.key === key) continue;
    if (el) el.remove();
    if (!w) continue;
    el = document.createElement('div');
    el.className = 'branch-nav in-chat ' + role;
    el.dataset.key = key; el.dataset.turn = w[0];
    el.innerHTML = draw(...w);
    row.appendChild(el);
  }
};
const later = () => { if (!queued) { queued = true; requestAnimationFrame(decorate); } };
new MutationObserver(later).observe(document.body, {childList: true, subtree: true});
document.addEventListener('click', (ev) => {
  const b = ev.target.closest('.branch-nav button[data-k]');
  if (!b) return;
  ev.preventDefault(); ev.stopPropagation();
  trigger('select', {index: parseInt(b.closest('.branch-nav').dataset.turn), value: parseInt(b.dataset.k)});
}, true);
later();
"""

KEEP_JS = """
element.addEventListener('click', (ev) => {
  const b = ev.target.closest('[data-keep]');
  if (!b || b.disabled) return;
  const grid = b.closest('[data-turn]');
  trigger('select', {index: parseInt(b.dataset.keep), value: grid ? parseInt(grid.dataset.turn) : null});
});
"""

CSS = """
#gauge { height: 14px; background: #e5e7eb; border-radius: 7px; overflow: hidden; }
#gauge .fill { height: 100%; background: linear-gradient(90deg, #3b82f6, #8b5cf6); }
#gauge-label, #stats { font-size: 0.85em; margin-top: 4px; font-family: monospace; }
#ctx table.spans { font-size: 0.8em; width: 100%; margin-top: 6px; }
#ctx table.spans td, #ctx table.spans th { padding: 1px 6px; }
#tokens .tok { display: inline-flex; flex-direction: column; align-items: center; margin: 1px;
  padding: 0 3px; border-radius: 4px; cursor: pointer; font-family: monospace; font-size: 0.85em; color: #111; }
#tokens .tok:hover { outline: 2px solid #ef4444; }
#tokens .tok .p { font-size: 0.7em; opacity: 0.7; }
.hint { font-size: 0.75em; opacity: 0.7; }
#status:empty { display: none; }
.branch-nav { display: inline-flex; align-items: center; gap: 2px; font-size: 0.8em; font-family: monospace; }
.branch-nav button { padding: 0 6px; border-radius: 4px; cursor: pointer; background: #eef2ff; }
.branch-nav button:disabled { opacity: 0.35; cursor: default; }
.branch-nav.in-chat { display: flex; margin: 0 12px 4px; }
.branch-nav.in-chat.user { justify-content: flex-end; }
#compare-grid { display: grid; gap: 8px; }
#compare-grid.empty { display: block; font-size: 0.8em; opacity: 0.7; }
#compare-grid .cmp-col { border: 1px solid #d1d5db; border-radius: 8px; padding: 6px; display: flex;
  flex-direction: column; gap: 4px; }
#compare-grid .cmp-col.current { border-color: #6366f1; }
#compare-grid .cmp-head { font-size: 0.75em; font-family: monospace; opacity: 0.8; }
#compare-grid .cmp-text { white-space: pre-wrap; font-size: 0.9em; flex: 1; }
#compare-grid .cmp-keep { align-self: flex-start; padding: 2px 8px; border-radius: 6px; background: #eef2ff; cursor: pointer;
  font-size: 0.8em; font-weight: 500; }
#compare-grid .cmp-current { font-size: 0.8em; color: #4f46e5; }
"""
