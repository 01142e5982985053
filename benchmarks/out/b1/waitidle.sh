# wait (up to $1 s) until the machine's CPUs were >= 90% idle over 3 s
end=$(( $(date +%s) + ${1:-120} ))
while [ $(date +%s) -lt $end ]; do
  read -r _ a b c d e f g h _ < /proc/stat; t1=$((a+b+c+d+e+f+g+h)); i1=$((d+e))
  sleep 3
  read -r _ a b c d e f g h _ < /proc/stat; t2=$((a+b+c+d+e+f+g+h)); i2=$((d+e))
  idle=$(( 100 * (i2 - i1) / (t2 - t1) ))
  if [ $idle -ge 90 ]; then echo "idle ${idle}% at $(date -u +%T), $(cut -d' ' -f1-3 /proc/loadavg)"; exit 0; fi
done
echo "not idle (last ${idle}%) at $(date -u +%T)"
