#!/bin/bash
# $1 tag, rest: cpu_fused_bench args; waits (max $WAIT s) for 1-min load < $LOADMAX before taking the lock
cd /work/wt/cf-batch
tag=$1; shift
end_epoch=$(date -d "${UNTIL:-21:32}" +%s)
while (( $(date +%s) < end_epoch )); do l=$(cut -d' ' -f1 /proc/loadavg); awk "BEGIN{exit !($l < ${LOADMAX:-1.5})}" && break; sleep 5; done
{ echo "uptime before: $(uptime)"; } > /tmp/cfb/$tag.txt
flock /work/notes/bench.lock bash -c "echo \"uptime locked: \$(uptime)\" >> /tmp/cfb/$tag.txt; timeout 230 /work/venvs/cf-batch/bin/python benchmarks/cpu_fused_bench.py $* --json /tmp/cfb/$tag.json >> /tmp/cfb/$tag.txt 2>/tmp/cfb/$tag.err; echo \"uptime after: \$(uptime)\" >> /tmp/cfb/$tag.txt"
