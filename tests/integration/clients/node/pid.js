// node-postgres: the backend PID the driver reports (client.processID, from BackendKeyData)
// against pg_backend_pid(), the PID of a self-sent NOTIFY, and pg_terminate_backend(<that
// pid>) from a second client ending exactly the first one's session.
// Usage: node pid.js <connection string> <channel>. Prints one JSON object on stdout.
'use strict';

const { Client } = require('pg');

async function main() {
  const [connectionString, channel] = process.argv.slice(2);
  if (!connectionString || !/^[a-z_][a-z0-9_]*$/.test(channel || '')) {
    throw new Error('usage: node pid.js <connection string> <channel>');
  }
  const victim = new Client({ connectionString });
  const other = new Client({ connectionString });
  await victim.connect();
  await other.connect();
  const out = {};
  const pid = victim.processID;
  const r = await victim.query('SELECT pg_backend_pid() AS pid');
  out.pid_matches = r.rows[0].pid === pid;
  const heard = new Promise((resolve) => victim.once('notification', resolve));
  await victim.query(`LISTEN ${channel}`);
  await victim.query(`NOTIFY ${channel}, 'self'`);
  const note = await heard;
  out.notify_pid_matches = note.processId === pid;
  // The victim hears of its termination: an error event with the server's 57P01 (then
  // "Connection terminated unexpectedly" as the socket ends); the first one is kept.
  const ended = new Promise((resolve) => {
    victim.on('error', (err) => resolve(err.code || String(err.message)));
  });
  const t = await other.query('SELECT pg_terminate_backend($1) AS ok', [pid]);
  out.terminated = t.rows[0].ok;
  out.victim_error = await ended;
  const alive = await other.query('SELECT 1 AS one');
  out.other_alive = alive.rows[0].one === 1;
  await other.end();
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
