// Preloaded into kinesis-local (`node -r ./loopback.js main.js`): it binds 0.0.0.0 by
// itself, and tests must listen on loopback only. Every listen() goes to 127.0.0.1.
const net = require("net");
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (args[0] !== null && typeof args[0] === "object") {
    args[0] = Object.assign({}, args[0], { host: "127.0.0.1" });
  } else if (typeof args[0] === "number" || typeof args[0] === "string") {
    if (typeof args[1] === "string") {
      args[1] = "127.0.0.1";
    } else {
      args.splice(1, 0, "127.0.0.1");
    }
  }
  return listen.apply(this, args);
};
