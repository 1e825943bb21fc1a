"""The page watcher shared by the browser tests (JavaScript run inside the page)."""

# Installed with add_init_script: runs at the start of every document of the page, and again for
# the next answer in the same document through window.__cpArm(). Logs a snapshot {t, state, code,
# text, note} of the newest answer on every change (t in epoch ms) to window.__cpLog, every value
# its text took to window.__cpTexts, and resolves window.__cpFinished with {log, texts} once the
# answer is done or in error. Watches `document`: the conversation does not exist yet.
WATCH_INIT_JS = """
window.__cpArm = () => {
  const log = [];
  const texts = [];
  window.__cpLog = log;
  window.__cpTexts = texts;
  const now = () => performance.timeOrigin + performance.now();
  const pushText = (t, text) => {
    if (texts.length === 0 || texts[texts.length - 1].text !== text) texts.push({ t, text });
  };
  window.__cpFinished = new Promise((resolve) => {
    const observer = new MutationObserver((records) => {
      const answers = document.querySelectorAll("#conversation .msg.assistant");
      const answer = answers[answers.length - 1];
      if (!answer) return;
      const t = now();
      for (const record of records) {
        if (record.type === "characterData" && answer.contains(record.target)) pushText(t, record.oldValue);
      }
      pushText(t, answer.textContent);
      const note = answer.parentElement.querySelector(".msg-note");
      const entry = {
        t,
        state: answer.dataset.state || "",
        code: answer.dataset.errorCode || "",
        text: answer.textContent,
        note: note && !note.hidden ? note.textContent : "",
      };
      const last = log[log.length - 1];
      if (!last || last.state !== entry.state || last.text !== entry.text || last.note !== entry.note) {
        log.push(entry);
      }
      if (entry.state === "done" || entry.state === "error") {
        observer.disconnect();
        resolve({ log, texts });
      }
    });
    observer.observe(document, {
      subtree: true, childList: true, characterData: true, characterDataOldValue: true,
      attributes: true, attributeFilter: ["data-state", "hidden"],
    });
  });
};
window.__cpArm();
"""
